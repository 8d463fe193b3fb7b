"""Choice-text scoring: normalisation and calibration (choice.py) and the experts' continuation_logprobs.

Stated tolerances (real packaged models, 12 MMLU-test + ARC-Easy questions; measured values in brackets):
- llama.cpp, shared prefix decoded once vs each choice decoded alone from an empty cache: |Δ| <= 1e-3
  nats per choice [0.0] where llama.cpp's kernels give the same numbers whatever the batch layout:
  SmolLM2's Q4_1/Q8_0 file and Gemma re-encoded as Q8_0. Gemma's packaged Q4_K_M file is not
  layout-invariant in llama.cpp itself (the same single sequence decoded in micro-batches of 16 or of
  32 tokens moves a choice's sum by up to 0.25 nats), so there per-token |Δ| <= 0.2 [0.13].
- llama.cpp vs transformers (fp32 on the dequantised weights), per-token-normalised |Δ log p|:
  on an F16 re-encoding (same weights) max <= 0.05 [~0.02]; on the packaged 4-bit files max <= 0.4,
  mean <= 0.1 [SmolLM2 0.19 / 0.056, Gemma 0.30 / 0.067] and the same char-normalised argmax on >= 80%
  of questions [100%, 92%].
"""

import numpy as np
import pytest

from moe2lib.core import choice
from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.models import experts

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
ARC_EASY = "/work/shared/datasets/arc/llm-foundry_derived/arc_easy_test.jsonl"
TOL_SHARED = 1e-3


# --- choice.py: known answers -------------------------------------------------------------------------

def test_normalise_methods():
    lp, nt, nc = np.array([-4.0, -6.0]), np.array([2, 3]), np.array([8, 12])
    np.testing.assert_allclose(choice.normalise(lp, nt, nc, "char"), [-0.5, -0.5])
    np.testing.assert_allclose(choice.normalise(lp, nt, nc, "token"), [-2.0, -2.0])
    np.testing.assert_allclose(choice.normalise(lp, nt, nc, "none"), lp)
    np.testing.assert_allclose(choice.normalise(lp, nt, nc, "pmi", unconditional=[-1.0, -5.0]), [-3.0, -1.0])
    with pytest.raises(InputError, match="unconditional"):
        choice.normalise(lp, nt, nc, "pmi")
    with pytest.raises(InputError, match="known"):
        choice.normalise(lp, nt, nc, "bytes")
    reqs = [[("Question: q?\nAnswer:", " yes"), ("Question: q?\nAnswer:", " no")]]
    assert choice.unconditional_requests(reqs) == [[("Answer:", " yes"), ("Answer:", " no")]]


def test_choice_distribution_and_pad():
    p = choice.choice_distribution([0.0, np.log(3.0)])
    np.testing.assert_allclose(p, [0.25, 0.75])
    np.testing.assert_allclose(choice.choice_distribution([0.0, 2 * np.log(3.0)], temperature=2.0), [0.25, 0.75])
    np.testing.assert_allclose(choice.choice_distribution([1000.0, 1000.0]), [0.5, 0.5])  # no overflow
    probs, mask = choice.pad([np.array([0.25, 0.75]), np.array([0.2, 0.3, 0.1, 0.1, 0.3])])
    assert probs.shape == mask.shape == (2, 5)
    np.testing.assert_allclose(probs.sum(1), 1)
    assert mask.sum(1).tolist() == [2, 5] and probs[0, 2:].tolist() == [0, 0, 0]
    with pytest.raises(InputError, match="width"):
        choice.pad([np.ones(6) / 6])


def test_fit_temperature_recovers_the_generating_one():
    rng = np.random.default_rng(0)
    n_choices = rng.integers(2, 6, size=4000)
    scores = [rng.normal(0, 3, size=k) for k in n_choices]
    gold = [rng.choice(len(s), p=choice.choice_distribution(s, temperature=2.0)) for s in scores]
    t = choice.fit_temperature(scores, gold)
    assert abs(t - 2.0) < 0.15, t
    padded, mask = choice.pad(scores)
    assert choice.fit_temperature(padded, gold, mask=mask) == pytest.approx(t, rel=1e-4)
    assert choice.nll(padded, mask, gold, t) < choice.nll(padded, mask, gold, 1.0)


# --- experts: real models --------------------------------------------------------------------------------

def as_request(q: loaders.Question):
    """lm-eval's layout: "Question: ...\\nAnswer:" then " <choice>" (ARC's query already says "Question:")."""
    stem = q.question if q.question.startswith("Question:") else f"Question: {q.question}"
    return [(f"{stem}\nAnswer:", f" {c}") for c in q.choices]


WINOGRANDE_LIKE = [("The trophy doesn't fit into the brown suitcase because the trophy", " is too large."),
                   ("The trophy doesn't fit into the brown suitcase because the suitcase", " is too large.")]
EDGE_CASES = [
    [("Question: Which animal says meow?\nAnswer:", " The cat"), ("Question: Which animal says meow?\nAnswer:", " The dog"),
     ("Question: Which animal says meow?\nAnswer:", " The cow says moo")],  # continuations share a first token
    [("Question: What colour is the sky?\nAnswer:", " blue"), ("Question: What colour is the sky?\nAnswer:", " blue sky"),
     ("Question: What colour is the sky?\nAnswer:", " blue")],  # one choice a prefix of another, a duplicate
]


@pytest.fixture(scope="module")
def questions():
    return loaders.mmlu_sample(6, seed=2) + loaders.load_jsonl(ARC_EASY)[:6]


@pytest.fixture(scope="module", params=[("smollm2-135m-instruct", "native", TOL_SHARED), ("gemma3-270m", "Q8_0", TOL_SHARED),
                                        ("gemma3-270m", "native", None)], ids=lambda p: f"{p[0]}-{p[1]}")
def llama(request):
    name, weights, tol = request.param
    e = experts.make_expert(name, backend="llama_cpp", n_threads=1, weights=weights)
    yield e, tol
    e.close()


@pytest.mark.slow
def test_shared_prefix_matches_separate_decodes(llama, questions):
    llama, tol = llama
    reqs = [as_request(q) for q in questions[::2]] + [WINOGRANDE_LIKE] + EDGE_CASES
    shared = llama.continuation_logprobs(reqs)
    alone = llama.continuation_logprobs(reqs, shared=False)
    for (a, na), (b, nb), req in zip(shared, alone, reqs):
        assert a.dtype == np.float64 and a.shape == (len(req),) and (a < 0).all()
        assert na.tolist() == nb.tolist() == [len(llama.encode_continuation(c)) for _, c in req]
        if tol is None:  # a file whose kernels depend on the batch layout: per-token bound
            assert np.abs((a - b) / na).max() <= 0.2, (a, b)
        else:
            np.testing.assert_allclose(a, b, atol=tol, rtol=0)
    if tol is not None:
        blue, blue_sky, blue2 = shared[-1][0]
        assert blue == blue2 and blue_sky < blue
        # a question scored after others gives what it gives alone (the memory is cleared between questions)
        np.testing.assert_allclose(llama.continuation_logprobs(reqs[-3:-2])[0][0], shared[-3][0], atol=1e-6)


def test_continuation_errors():
    e = experts.make_expert("smollm2-135m-instruct", n_threads=1)
    with pytest.raises(InputError, match="no tokens"):
        e.continuation_logprobs([[("Question: x\nAnswer:", " a"), ("Question: x\nAnswer:", "")]])
    with pytest.raises(InputError, match="empty context"):
        e.continuation_logprobs([[("", " a"), ("", " b")]])
    e.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_agrees_with_transformers(name, questions):
    reqs = [as_request(q) for q in questions]
    with experts.make_expert(name, backend="transformers", n_threads=1) as hf:
        ref = hf.continuation_logprobs(reqs)
    for weights in ("F16", "native"):
        with experts.make_expert(name, backend="llama_cpp", n_threads=1, weights=weights) as ll:
            got = ll.continuation_logprobs(reqs)
        per_token = np.concatenate([np.abs(a - b) / na for (a, na), (b, nb) in zip(got, ref)])
        assert all(na.tolist() == nb.tolist() for (_, na), (_, nb) in zip(got, ref))  # tokenised alike
        if weights == "F16":
            assert per_token.max() <= 0.05, per_token.max()
            continue
        assert per_token.max() <= 0.4 and per_token.mean() <= 0.1, (per_token.max(), per_token.mean())
        chars = [[len(c) for _, c in r] for r in reqs]
        same = [(a / n).argmax() == (b / n).argmax() for (a, _), (b, _), n in zip(got, ref, chars)]
        assert np.mean(same) >= 0.8, same


@pytest.mark.slow
def test_lora_adapter_is_honoured(tmp_path, questions):
    """A random LoRA (built as in test_lora.py) moves llama.cpp's choice scores as it moves transformers+peft's:
    per-token scores within the base models' tolerance of each other, and moved far more than that."""
    from test_lora import random_peft_adapter

    from moe2lib.models import lora, registry

    name = "smollm2-135m-instruct"
    peft_dir = random_peft_adapter(name, tmp_path / "peft")
    gguf = lora.export_gguf(peft_dir, registry.locate(name, "llm"), tmp_path / "a.gguf")
    reqs = [as_request(q) for q in questions[:4]]
    with experts.make_expert(name, n_threads=1) as base, \
            experts.make_expert(name, adapter=str(gguf), n_threads=1) as ll, \
            experts.make_expert(name, backend="transformers", adapter=str(peft_dir), n_threads=1) as hf:
        b0, a, b = (np.concatenate([lp / n for lp, n in e.continuation_logprobs(reqs)]) for e in (base, ll, hf))
    moved, err = np.abs(a - b0).mean(), np.abs(a - b)  # seen: 0.43; 0.15 max, 0.034 mean
    assert err.max() <= 0.4 and err.mean() <= 0.1 and moved >= 5 * err.mean(), (moved, err)
