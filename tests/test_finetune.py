"""LoRA fine-tuning on SmolLM2 (one thread: on the shared 2-core machine two torch threads
ran 5x slower under load): the loss sits on the answer letter only, seeds fix the result, and a
finished expert's folder is reused while an interrupted one trains again."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from moe2lib import data, experts
from moe2lib.errors import InputError
from moe2lib.finetune import LoraFineTuner

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def questions():
    qs = data.load_mmlu("auxiliary_train")
    # short questions keep the steps fast; all with the answer C so that learning it is visible
    short = [q for q in qs if len(q.question) < 200 and len(q.choices) == 4]
    return [q for q in short if q.answer == 2][:12]


def tuner(**kw):
    args = dict(batch_size=4, max_steps=3, lr=2e-3, warmup_ratio=0.0, n_threads=1, progress=False)
    return LoraFineTuner(MODEL, **{**args, **kw})


def test_examples_are_tokenised_as_the_experts_score_them(questions):
    ft = tuner()
    _, tok = ft.load_base()
    examples = ft.encode(tok, questions[:3])
    with experts.make_expert(MODEL, n_threads=1) as ll:
        letter_c = ll._load().tokenize(b" C", add_bos=False, special=False)
        for q, (ids, target) in zip(questions, examples):
            assert ids == ll.encode(data.format_prompt(q))
            assert [target] == letter_c


def test_prompts_over_cutoff_are_dropped_not_cut(questions):
    """A cut prompt (its passage gone) is not what the expert is later asked, so it is not trained on."""
    examples = [([1] * 5, 0), ([1] * 10, 1), ([1] * 3, 2)]
    assert list(LoraFineTuner(MODEL, cutoff_len=5).within_cutoff(examples)) == [0, 2]
    with pytest.raises(InputError, match="cutoff_len=4"):
        tuner(cutoff_len=4).fit(questions[:2])


def test_loss_is_only_the_letter_cross_entropy(questions):
    """Known answer: the padded-batch loss equals -log p(letter | prompt) from separate unpadded forwards."""
    import torch

    ft = tuner()
    model, tok = ft.load_base()
    model.eval()
    examples = ft.encode(tok, questions[:4])
    batch = ft.collate(examples, pad_id=tok.pad_token_id or 0)
    with torch.no_grad():
        got = ft.batch_loss(model, *batch, reduction="none").numpy()
        want = [-torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[t].item()
                for ids, t in examples]
        # the usual causal-LM loss over every prompt token is a different number
        ids = torch.tensor([examples[0][0] + [examples[0][1]]])
        full = model(input_ids=ids, labels=ids).loss.item()
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert abs(full - want[0]) > 0.5


def test_seeded_training_is_deterministic_learns_the_letter_and_resumes(questions, tmp_path):
    import torch

    a = tuner(seed=0).fit(questions, out_dir=tmp_path / "a")
    b = tuner(seed=0).fit(questions, out_dir=tmp_path / "b")
    c = tuner(seed=1, max_steps=1).fit(questions)
    wa = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 30 * 4 * 2
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in a.history_] == [h["loss"] for h in b.history_]
    assert a.history_[0]["loss"] != c.history_[0]["loss"]
    assert len(a.history_) == 3 and {"step", "loss", "lr", "tokens_per_s"} <= set(a.history_[0])

    # three steps at lr 2e-3 on answer-C questions raise p(C) on them (the base model prefers A)
    batch = a.collate(a.encode(a.tokenizer_, questions), pad_id=0)
    with torch.no_grad():
        tuned = a.batch_loss(a.model_, *batch).item()
        with a.model_.disable_adapter():
            base = a.batch_loss(a.model_, *batch).item()
    assert tuned < base - 0.3, (tuned, base)

    # a finished folder is reused (no training); an interrupted one is cleaned up and trained again
    mtime = (tmp_path / "a" / "adapter_model.safetensors").stat().st_mtime_ns
    again = tuner(seed=0).fit(questions, out_dir=tmp_path / "a")
    assert again.skipped_ and again.final_loss_ == a.final_loss_ and not hasattr(again, "model_")
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    (tmp_path / ".b.x1y2.tmp").mkdir()
    (tmp_path / "b" / "meta.json").unlink()  # as if killed before the folder was complete
    redo = tuner(seed=0).fit(questions, out_dir=tmp_path / "b")
    assert not redo.skipped_ and (tmp_path / "b" / "meta.json").exists()
    # a clone carries meta.json and history.json (small, committed) but no weights: trained again
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    fresh = tuner(seed=0).fit(questions, out_dir=tmp_path / "a")
    assert not fresh.skipped_ and (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".b.*.tmp"))
    assert [h["loss"] for h in redo.history_] == [h["loss"] for h in a.history_]
    # other parameters make it a different expert: trained again, not reused
    assert not tuner(seed=0, max_steps=1).fit(questions, out_dir=tmp_path / "a").skipped_


def test_bad_parameters():
    with pytest.raises(InputError, match="batch_size"):
        LoraFineTuner(MODEL, batch_size=0).fit([])
    with pytest.raises(InputError, match="questions"):
        LoraFineTuner(MODEL).fit([])


def test_select_examples_samples_and_tops_up_small_clusters():
    from moe2lib.finetune import select_examples

    rng = np.random.default_rng(0)
    ft_cluster = np.repeat([0, 1, 2], [50, 5, 45])
    ft_dist = rng.random((100, 3))
    idx, info = select_examples(ft_cluster, ft_dist, 0, max_examples=20, min_examples=10, seed=0)
    assert len(idx) == 20 and set(ft_cluster[idx]) == {0} and len(set(idx)) == 20
    assert info == {"cluster_size": 50, "n_from_cluster": 20, "n_topped_up": 0}
    assert np.array_equal(idx, select_examples(ft_cluster, ft_dist, 0, 20, 10, seed=0)[0])
    idx, info = select_examples(ft_cluster, ft_dist, 1, max_examples=20, min_examples=12, seed=0)
    assert info == {"cluster_size": 5, "n_from_cluster": 5, "n_topped_up": 7}
    others = np.flatnonzero(ft_cluster != 1)
    nearest = others[np.argsort(ft_dist[others, 1])[:7]]
    assert list(idx[:5]) == list(range(50, 55)) and list(idx[5:]) == list(nearest)
    assert len(select_examples(ft_cluster, ft_dist, 2, max_examples=0)[0]) == 45  # 0: the whole cluster
    with pytest.raises(InputError, match="cluster"):
        select_examples(ft_cluster, ft_dist, 3, 10)
