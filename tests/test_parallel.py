"""Jobs in spawned processes: results in order and equal to a serial run, errors raised, and the two users
of it (scoring experts, training experts) give the same files as one process does."""

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_finetune import arc_items, tuner
from test_scoring import HashExpert, _questions

from moe2lib.core.scores import Scores
from moe2lib.errors import InputError
from moe2lib.infra import parallel
from moe2lib.models import scoring


def test_run_keeps_order_and_matches_serial():
    jobs = [(b, e) for b, e in ((2, 10), (3, 4), (7, 2), (5, 3))]
    assert parallel.run(pow, jobs, 2) == parallel.run(pow, jobs, 1) == [1024, 81, 49, 125]
    assert parallel.run(int, [("ff",), ("10",)], 2, base=16) == [255, 16]  # keyword arguments reach every job


def test_run_raises_the_jobs_error_and_checks_workers():
    with pytest.raises(ValueError, match="invalid literal"):
        parallel.run(int, [("12",), ("not a number",)], 2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="workers"):
            parallel.run(pow, [(2, 2)], bad)


def test_scoring_experts_in_processes_gives_the_serial_file(tmp_path):
    qs = _questions(24)
    serial = scoring.score_questions(qs, [HashExpert("a"), HashExpert("b"), HashExpert("c")], tmp_path / "s.npz",
                                     chunk=8, progress=False)
    both = scoring.score_questions(qs, [HashExpert("a"), HashExpert("b"), HashExpert("c")], tmp_path / "p.npz",
                                   chunk=8, progress=False, workers=2)
    np.testing.assert_array_equal(both.probs, serial.probs)
    assert both.experts.tolist() == ["a", "b", "c"]
    assert not (tmp_path / "p.npz.experts").exists()
    np.testing.assert_array_equal(Scores.load(tmp_path / "p.npz").probs, serial.probs)
    # one expert, or more workers than experts: each expert's rows in shards, one per worker, put back in order
    one = scoring.score_questions(qs, [HashExpert("b")], tmp_path / "one.npz", chunk=8, progress=False, workers=2)
    three = scoring.score_questions(qs[:5], [HashExpert("a"), HashExpert("c")], tmp_path / "three.npz", chunk=2,
                                    progress=False, workers=3)
    np.testing.assert_array_equal(one.probs[:, 0], serial.probs[:, 1])
    np.testing.assert_array_equal(one.qid, serial.qid)
    np.testing.assert_array_equal(three.probs, serial.probs[:5, [0, 2]])
    assert not (tmp_path / "one.npz.experts").exists()


def test_scoring_cost_is_the_model_file_size():
    """What orders the shards (costliest first): Gemma's file is over 1.5x SmolLM2's; an expert whose model
    cannot be found counts 1."""
    from moe2lib.models.experts import Expert

    gemma, smol = scoring._cost(Expert("gemma3-270m")), scoring._cost(Expert("smollm2-135m-instruct"))
    assert gemma > 1.5 * smol > 1e8
    assert scoring._cost(HashExpert("a")) == 1.0


@pytest.mark.slow
def test_fit_all_in_processes_trains_the_serial_adapters(tmp_path):
    from moe2lib.data import loaders
    from moe2lib.models import finetune

    root = loaders.resolve_data_dir(None, "arc")
    qs = loaders.load_jsonl(root / "arc" / "llm-foundry_derived" / "arc_easy_test.jsonl", "arc_easy")
    short = [q for q in qs if len(q.question) < 120 and max(len(c) for c in q.choices) < 25]
    a, b = arc_items(short[:8]), arc_items(short[8:16])
    kw = dict(target="text", max_steps=2, seed=3)
    serial = [finetune.fit_saved(tuner(**kw), part, tmp_path / name) for name, part in (("s0", a), ("s1", b))]
    jobs = [(tuner(**kw), a, tmp_path / "p0"), (tuner(**kw), b, tmp_path / "p1")]
    fitted = finetune.fit_all(jobs, workers=2)
    assert [f.skipped_ for f in fitted] == [False, False]
    for s, p in zip(serial, fitted):
        assert p.n_train_ == s.n_train_ and len(p.history_) == len(s.history_) == 2
        ws, wp = (load_file(f.adapter_dir_ / "adapter_model.safetensors") for f in (s, p))
        assert ws.keys() == wp.keys()
        for k in ws:
            np.testing.assert_array_equal(wp[k], ws[k])
    assert [f.skipped_ for f in finetune.fit_all(jobs, workers=2)] == [True, True]  # done: nothing retrained


def test_torch_threads_is_restored_after_the_block_and_after_an_error():
    import torch

    before = torch.get_num_threads()
    with parallel.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with parallel.torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with parallel.torch_threads(None):
        assert torch.get_num_threads() == before


def test_a_local_dask_cluster_of_two_single_thread_workers_gives_the_serial_file(tmp_path):
    pytest.importorskip("distributed")
    qs = _questions(24)
    serial = scoring.score_questions(qs, [HashExpert("a"), HashExpert("b"), HashExpert("c")], tmp_path / "s.npz",
                                     chunk=8, progress=False)
    dask = scoring.score_questions(qs, [HashExpert("a"), HashExpert("b"), HashExpert("c")], tmp_path / "d.npz",
                                   chunk=8, progress=False, workers=2, scheduler="local")
    np.testing.assert_array_equal(dask.probs, serial.probs)
    assert dask.experts.tolist() == ["a", "b", "c"] and not (tmp_path / "d.npz.experts").exists()
    with pytest.raises(InputError, match="scheduler"):
        parallel.run(pow, [(2, 2)], 2, scheduler="nowhere")


def test_costliest_jobs_start_first_and_results_keep_the_jobs_order():
    assert parallel.submission_order([3.0, 9.0, 1.0, 9.0], 4) == [1, 3, 0, 2]   # ties keep the given order
    assert parallel.submission_order(None, 3) == [0, 1, 2]
    with pytest.raises(InputError, match="2 cost estimates for 3 jobs"):
        parallel.submission_order([1, 2], 3)
    started = []
    out = parallel.run(_record_start, [(i, started) for i in range(4)], 1, cost=[3.0, 9.0, 1.0, 5.0])
    assert started == [1, 3, 0, 2] and out == [0, 10, 20, 30]


def _record_start(i, started):
    started.append(i)
    return 10 * i


def test_training_cost_counts_characters_times_epochs():
    from moe2lib.data.loaders import Question
    from moe2lib.data.tasks import ChoiceItem
    from moe2lib.models import finetune

    item = ChoiceItem("q1", "t", "x", ("ab", "abcd"), (" c", " de"), 1)
    q = Question("what?", ("yes", "no"), 0, "s")
    two = finetune.LoraFineTuner("smollm2-135m-instruct", finetune.LoraSettings(target="text", epochs=2))
    assert finetune.training_cost(two, [item, item]) == 2 * 2 * (4 + 3)
    letter = finetune.LoraFineTuner("smollm2-135m-instruct", finetune.LoraSettings(target="letter", epochs=1))
    assert finetune.training_cost(letter, [q]) == 5 + 3 + 2
