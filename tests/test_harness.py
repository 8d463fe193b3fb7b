"""lm-evaluation-harness, the field's reference scorer, gives our choice scores.

Real (context, continuation) pairs of the benchmark (3 questions with a context of at most 400 characters from
each of 8 tasks: MMLU, ARC-Challenge, OpenBookQA, WinoGrande, COPA, PIQA, CommonsenseQA, Social IQa) are
scored twice: by lm-eval's ``HFLM(pretrained=<the cached transformers checkpoint>)``, which loads the folder
itself, and by our transformers backend (``Expert.continuation_logprobs``). Stated tolerance: max |Δ log p|
<= 5e-3 nats per pair, and the same argmax per question on the raw sums (lm-eval's acc) and per character
(acc_norm). Measured over the 72 pairs (lm-eval 0.4.13, torch 2.13 CPU): max |Δ| SmolLM2 [3.3e-4], Gemma [5.8e-4]; every
argmax the same.

Skipped where lm-eval is not installed (``bash run.sh test`` installs it from requirements-nodeps.txt;
``pip install -e '.[harness]'`` elsewhere) or the benchmark data folder is missing.
"""

import importlib.util

import numpy as np
import pytest
from conftest import needs_data

from moe2lib.data import tasks
from moe2lib.models import experts, registry

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
TASKS = ("mmlu", "arc_challenge", "openbookqa", "winogrande", "copa", "piqa", "commonsense_qa", "siqa")
PER_TASK = 3
MAX_CONTEXT = 400  # characters: bounds HFLM's full-sequence logits (Gemma's vocabulary is 262k)
TOL = 5e-3

needs_harness = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness (lm_eval) is not installed: `bash run.sh test` installs it, "
           "or `pip install -e '.[harness]'`")


@pytest.fixture(scope="module")
def questions():
    rng = np.random.default_rng(0)
    picked = []
    for name in TASKS:
        items = [i for i in tasks.load_task(name) if max(len(c) for c in i.contexts) <= MAX_CONTEXT]
        picked += [items[k] for k in sorted(rng.choice(len(items), PER_TASK, replace=False))]
    return picked


def harness_logprobs(path, requests, batch_size=8):
    """Per question, lm-eval's log p(continuation | context) per choice, from ``HFLM`` on the folder alone."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(path), device="cpu", batch_size=batch_size)
    flat = [pair for req in requests for pair in req]
    out = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(flat)],
                           disable_tqdm=True)
    lps = np.array([lp for lp, _ in out], dtype=np.float64)
    return np.split(lps, np.cumsum([len(r) for r in requests])[:-1])


@pytest.mark.slow
@needs_harness
@needs_data
@pytest.mark.parametrize("name", MODELS)
def test_harness_agrees_with_our_scoring(name, questions, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    requests = [q.pairs() for q in questions]
    assert len(set(q.task for q in questions)) == len(TASKS) and sum(map(len, requests)) >= 60
    with experts.make_expert(name, backend="transformers", n_threads=2) as ours:
        got = [lp for lp, _ in ours.continuation_logprobs(requests)]
    ref = harness_logprobs(registry.hf_model_dir(name), requests)
    delta = np.concatenate([np.abs(a - b) for a, b in zip(got, ref)])
    assert delta.max() < TOL, (delta.max(), [q.source for q in questions])
    chars = [np.array([len(c) for _, c in r], dtype=np.float64) for r in requests]
    for a, b, n, q in zip(got, ref, chars, questions):
        assert a.argmax() == b.argmax(), (q.source, a, b)
        assert (a / n).argmax() == (b / n).argmax(), (q.source, a / n, b / n)
