"""Both expert backends on the packaged models, on real MMLU prompts.

Stated tolerance (same GGUF weights; llama.cpp multiplies 4-bit weights with 8-bit-quantised
activations, transformers with the dequantised fp32 weights): over the answer letters,
max |Δp| <= 0.1, mean |Δp| <= 0.02, and the same argmax on at least 95% of prompts.
"""

import numpy as np
import pytest

from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.models import experts

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@pytest.fixture(scope="module")
def sample():
    return loaders.mmlu_sample(57, seed=1)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    ll = experts.make_expert(request.param, backend="llama_cpp", n_threads=2)
    hf = experts.make_expert(request.param, backend="transformers", n_threads=2)
    yield ll, hf
    ll.close()
    hf.close()


@pytest.mark.slow  # loads each model in llama.cpp and in torch
def test_backends_tokenise_alike(pair, sample):
    ll, hf = pair
    for q in sample[:10]:
        prompt = loaders.format_prompt(q)
        assert ll.encode(prompt) == hf.encode(prompt)


@pytest.mark.slow  # scores 57 prompts with both backends
def test_backends_agree_within_tolerance(pair, sample):
    ll, hf = pair
    prompts = [loaders.format_prompt(q) for q in sample]
    a, b = ll.choice_probs(prompts), hf.choice_probs(prompts)
    for p in (a, b):
        assert p.shape == (len(prompts), 4)
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
        assert (p >= 0).all()
    diff = np.abs(a - b)
    assert diff.max() <= 0.1 and diff.mean() <= 0.02, (diff.max(), diff.mean())
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


@pytest.mark.slow  # loads both models
def test_gemma_prepends_bos_and_smollm2_does_not(sample):
    prompt = loaders.format_prompt(sample[0])
    gemma = experts.make_expert("gemma3-270m")
    smol = experts.make_expert("smollm2-135m-instruct")
    assert gemma.encode(prompt)[0] == 2 and gemma.encode(prompt)[1] != 2
    assert smol.encode(prompt)[0] != 0 and len(smol.encode(prompt)) > 20
    gemma.close()
    smol.close()


@pytest.mark.slow  # scores with a model
def test_results_do_not_depend_on_what_came_before(sample):
    e = experts.make_expert("smollm2-135m-instruct", n_threads=2)
    prompts = [loaders.format_prompt(q) for q in sample[:4]]
    forward = e.letter_logits(prompts)
    backward = e.letter_logits(prompts[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, atol=1e-4)
    e.close()


@pytest.mark.slow  # loads a model
def test_unknown_backend_and_missing_adapter():
    with pytest.raises(InputError, match="backend"):
        experts.make_expert("gemma3-270m", backend="vllm-in-process")
    e = experts.make_expert("smollm2-135m-instruct", adapter="/nonexistent/lora.gguf")
    with pytest.raises(InputError, match="lora.gguf"):
        e.letter_logits(["x"])


def test_registry_round_trip_and_errors(tmp_path):
    import json

    from moe2lib.models.experts import ExpertSpec, read_registry, write_registry

    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "e0.gguf").write_bytes(b"x")
    specs = [ExpertSpec("e0", "gemma3-270m", str(tmp_path / "adapters" / "e0.gguf"), cluster=0, device="rtx4090"),
             ExpertSpec("e1", "smollm2-135m-instruct", None, cluster=None, device="jetson-agx-orin-64gb")]
    path = write_registry(tmp_path / "experts.json", specs, e0={"train_examples": 12})
    raw = json.loads(path.read_text())
    assert raw[0]["adapter"] == "adapters/e0.gguf" and raw[0]["train_examples"] == 12
    assert read_registry(path) == specs
    raw[1]["cluster"] = "3"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"\[1\]\.cluster"):
        read_registry(path)
    raw[1]["cluster"] = 1
    raw[0]["adapter"] = "adapters/missing.gguf"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="missing.gguf"):
        read_registry(path)
    raw[0]["adapter"] = None
    raw[1]["base_model"] = "smolm2-135m"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"experts\.json, parameter '\[1\]\.base_model': unknown llm model 'smolm2"):
        read_registry(path)
