import itertools
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moe2lib.analysis import evaluation
from moe2lib.core import gating
from moe2lib.errors import InputError

from conftest import examples

FAST = dict(hidden=(32, 16), lr=1e-2, max_epochs=25, patience=8, seed=0)


@pytest.fixture(scope="module")
def synth():
    X, probs, answer, cluster = gating.synthetic_experts(500, 16, seed=0)
    tr, te = np.arange(300), np.arange(300, 500)
    net = gating.GatingNetwork(**FAST).fit(X[tr], probs[tr], answer[tr])
    return X, probs, answer, cluster, tr, te, net


# ----------------------------------------------------------------------------- known answer

def test_moe2_routes_each_cluster_to_its_expert_and_beats_majority_voting(synth):
    X, probs, answer, cluster, tr, te, net = synth
    gate = net.predict_proba(X[te])
    # expert 0 owns cluster 0, expert 1 cluster 1, expert 2 (uniform) none
    assert gate[cluster[te] == 0, 0].mean() > 0.95
    assert gate[cluster[te] == 1, 1].mean() > 0.95
    assert gate[:, 2].mean() < 0.05
    methods, _ = evaluation.correctness(probs[te], answer[te], gate, best=evaluation.best_expert(probs[tr], answer[tr]),
                                        top_k=2)
    acc = {k: v.mean() for k, v in methods.items()}
    assert acc["oracle"] == 1.0
    assert acc["moe2"] >= 0.97 and acc["moe2_topk"] >= 0.97 and acc["router_top1"] >= 0.97
    # majority voting: one right vote against a confident wrong one and the uniform expert's "A"
    assert acc["majority_voting"] < 0.40
    assert acc["moe2"] - acc["majority_voting"] > 0.55
    assert 0.35 < acc["average_expert"] < 0.50  # (1 + 0 + 1/4) / 3 ≈ 0.42
    assert (net.predict(X[te], probs[te]) == answer[te]).mean() == acc["moe2"]


def test_training_history_and_early_stopping_restore_the_best_epoch():
    X, probs, answer, _ = gating.synthetic_experts(200, 8, seed=3)
    net = gating.GatingNetwork(hidden=(16, 8), lr=5e-2, max_epochs=200, patience=4, lr_patience=1, seed=1)
    net.fit(X, probs, answer)
    val = np.array([h["val_loss"] for h in net.history_])
    assert len(net.history_) < 200  # stopped early
    assert val[net.best_epoch_ - 1] <= val.min() + 1e-6
    assert len(net.history_) == net.best_epoch_ + net.patience
    assert net.history_[-1]["lr"] < net.lr  # ReduceLROnPlateau fired
    assert net.n_val_ == 30 and net.n_train_ == 170
    # the restored weights are the best epoch's: their validation loss matches the record
    rng = np.random.default_rng(net.seed)
    val_rows = np.sort(rng.permutation(200)[:30])
    assert net.loss(X[val_rows], probs[val_rows], answer[val_rows]) == pytest.approx(val.min(), rel=1e-5)


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch():
    X, probs, answer, _ = gating.synthetic_experts(64, 8, seed=4)
    common = dict(hidden=(8, 8), dropout=0.0, max_epochs=3, val_fraction=0.0, seed=2)
    full = gating.GatingNetwork(batch_size=64, grad_accum=1, **common).fit(X, probs, answer)
    accum = gating.GatingNetwork(batch_size=32, grad_accum=2, **common).fit(X, probs, answer)
    np.testing.assert_allclose(full.predict_proba(X), accum.predict_proba(X), atol=1e-5)


def test_fit_is_deterministic_for_a_seed_and_differs_across_seeds():
    X, probs, answer, _ = gating.synthetic_experts(120, 8, seed=5)
    a = gating.GatingNetwork(hidden=(16, 8), max_epochs=3, seed=7).fit(X, probs, answer).predict_proba(X)
    b = gating.GatingNetwork(hidden=(16, 8), max_epochs=3, seed=7).fit(X, probs, answer).predict_proba(X)
    c = gating.GatingNetwork(hidden=(16, 8), max_epochs=3, seed=8).fit(X, probs, answer).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    np.testing.assert_allclose(a.sum(1), 1.0)


def test_save_load_round_trip_gives_identical_predictions(synth, tmp_path):
    X, probs, answer, _, tr, te, net = synth
    weights, config = net.save(tmp_path / "gating.safetensors", embedding_model="test")
    assert weights.name == "gating.safetensors" and config.name == "gating.json"
    cfg = json.loads(config.read_text())
    assert cfg["params"]["hidden"] == [32, 16] and cfg["embedding_model"] == "test"
    for path in (weights, config, tmp_path / "gating"):
        back = gating.GatingNetwork.load(path)
        np.testing.assert_array_equal(back.predict_proba(X[te]), net.predict_proba(X[te]))
        np.testing.assert_array_equal(back.predict(X[te], probs[te], top_k=1), net.predict(X[te], probs[te], top_k=1))
    assert back.history_ == net.history_ and back.best_epoch_ == net.best_epoch_
    assert b"pickle" not in weights.read_bytes()[:200]


def test_load_rejects_missing_or_foreign_files(synth, tmp_path):
    net = synth[-1]
    with pytest.raises(InputError, match="missing gating file"):
        gating.GatingNetwork.load(tmp_path / "none.safetensors")
    net.save(tmp_path / "g.safetensors")
    (tmp_path / "g.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="format") as err:
        gating.GatingNetwork.load(tmp_path / "g.safetensors")
    assert err.value.path.endswith("g.json")
    net.save(tmp_path / "h.safetensors")
    cfg = json.loads((tmp_path / "h.json").read_text())
    cfg["n_experts"] = 5
    (tmp_path / "h.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="do not match"):
        gating.GatingNetwork.load(tmp_path / "h.json")


# ----------------------------------------------------------------------------- input validation

def test_fit_validates_inputs_and_names_the_parameter():
    X, probs, answer, _ = gating.synthetic_experts(40, 8, seed=6)
    net = gating.GatingNetwork(**FAST)
    with pytest.raises(InputError, match="40 scored prompts but 39 embeddings") as err:
        net.fit(X[:39], probs, answer, path="scores_mmlu.npz")
    assert err.value.param == "probs" and err.value.path == "scores_mmlu.npz"
    qid = np.array([f"q{i}" for i in range(40)])
    with pytest.raises(InputError, match="different prompt order") as err:
        net.fit(X, probs, answer, x_qid=qid[::-1], qid=qid)
    assert err.value.param == "qid"
    bad = probs.copy()
    bad[3, 1, 0] = np.nan
    with pytest.raises(InputError, match=r"probs\[3, 1\] is not finite"):
        net.fit(X, bad, answer)
    bad = probs.copy()
    bad[2, 0] = [1.5, -0.5, 0, 0]
    with pytest.raises(InputError, match="negative"):
        net.fit(X, bad, answer)
    with pytest.raises(InputError, match="sums to 2"):
        net.fit(X, probs * 2, answer)
    Xn = X.copy()
    Xn[0, 0] = np.inf
    with pytest.raises(InputError, match="finite") as err:
        net.fit(Xn, probs, answer)
    assert err.value.param == "X"
    with pytest.raises(InputError, match="answer"):
        net.fit(X, probs, answer + 4)
    with pytest.raises(InputError, match="positive integer") as err:
        gating.GatingNetwork(batch_size=0).fit(X, probs, answer)
    assert err.value.param == "batch_size"
    with pytest.raises(InputError, match="not fitted"):
        gating.GatingNetwork().predict_proba(X)


def test_predict_checks_the_embedding_width(synth):
    X, probs, *_, net = synth
    with pytest.raises(InputError, match="16"):
        net.predict_proba(X[:, :8])


# ----------------------------------------------------------------------------- pure functions

gates = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 6)),
                   elements=st.floats(0, 10, allow_nan=False, allow_infinity=False))


@settings(max_examples=examples(60), deadline=None)
@given(gates, st.data())
def test_subset_weights_sum_to_one_inside_the_subset_and_vanish_outside(gate, data):
    n, k = gate.shape
    mask = data.draw(hnp.arrays(bool, (k,)))
    w = gating.subset_weights(gate, mask)
    assert w.shape == (n, k) and (w >= 0).all()
    assert (w[:, ~mask] == 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0 if mask.any() else 0.0, atol=1e-12)
    rows = gate[:, mask].sum(1) > 0
    if mask.any():  # eq. (2) where the subset has gating mass; uniform where it underflowed to 0
        np.testing.assert_allclose(w[rows][:, mask], gate[rows][:, mask] / gate[rows][:, mask].sum(1, keepdims=True))
        np.testing.assert_allclose(w[~rows][:, mask], 1 / mask.sum())


@settings(max_examples=examples(60), deadline=None)
@given(gates, st.data())
def test_topk_keeps_exactly_k_of_the_largest_gates_in_the_subset(gate, data):
    n, k = gate.shape
    mask = data.draw(hnp.arrays(bool, (k,)))
    top = data.draw(st.integers(1, 7))
    keep = gating.topk_mask(gate, top, mask)
    assert keep.shape == (n, k)
    assert (keep.sum(1) == min(top, mask.sum())).all()
    assert not (keep & ~mask).any()
    for i in range(n):
        kept, dropped = gate[i, keep[i]], gate[i, mask & ~keep[i]]
        if kept.size and dropped.size:
            assert kept.min() >= dropped.max()


def test_topk_per_prompt_ties_and_renormalisation():
    gate = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    keep = gating.topk_mask(gate, 2, [True, True, True])
    np.testing.assert_array_equal(keep, [[1, 1, 0], [1, 0, 1]])  # tie 0.1/0.1: the lower index
    np.testing.assert_allclose(gating.subset_weights(gate, keep), [[0.625, 0.375, 0], [1 / 9, 0, 8 / 9]])
    np.testing.assert_array_equal(gating.topk_mask(gate, 5, [False, True, True]), [[0, 1, 1], [0, 1, 1]])
    with pytest.raises(InputError):
        gating.topk_mask(gate, 0, [True] * 3)
    with pytest.raises(InputError, match="last axis"):
        gating.topk_mask(gate, 1, [True] * 2)
    # one prompt's (K,) gate keeps its shape; k None is the whole subset; the default subset is all K
    np.testing.assert_array_equal(gating.topk_mask([0.1, 0.6, 0.3], 2), [False, True, True])
    np.testing.assert_array_equal(gating.topk_mask([0.1, 0.6, 0.3], None, [True, False, True]), [True, False, True])
    np.testing.assert_array_equal(gating.topk_mask(gate, None), np.ones((2, 3), bool))
    for bad in (True, 1.5, "2"):
        with pytest.raises(InputError, match="positive integer"):
            gating.topk_mask(gate, bad)


def test_subset_weights_broadcast_many_subsets_over_many_prompts():
    gate = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    masks = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    w = gating.subset_weights(gate, masks[:, None, :])
    assert w.shape == (3, 2, 3)
    np.testing.assert_allclose(w[0], [[0.4, 0.6, 0], [2 / 3, 1 / 3, 0]])
    np.testing.assert_allclose(w[1], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(w[2], 0)


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(2, 5), st.integers(0, 2 ** 31))
def test_fuse_gives_distributions(n, k, c, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), (n, k))
    gate = rng.dirichlet(np.ones(k), n)
    mask = rng.random(k) < 0.5
    mask[rng.integers(k)] = True
    fused = gating.fuse(gating.subset_weights(gate, mask), probs)
    assert fused.shape == (n, c) and (fused >= 0).all()
    np.testing.assert_allclose(fused.sum(-1), 1.0)


def _naive_loss_and_acc(gate, probs, answer, mask):
    if not mask.any():
        return np.inf, np.nan
    losses, right = [], []
    for n in range(len(answer)):
        w = np.array([gate[n, k] if mask[k] else 0.0 for k in range(len(mask))])
        w /= w.sum()
        fused = sum(w[k] * probs[n, k] for k in range(len(mask)))
        losses.append(-np.log(max(fused[answer[n]], gating.PROB_FLOOR)))
        right.append(np.argmax(fused) == answer[n])
    return np.mean(losses), np.mean(right)


def test_subset_loss_and_accuracy_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    n, k, c = 30, 4, 4
    probs = rng.dirichlet(np.ones(c) * 0.5, (n, k))
    probs[0, :, :] = np.eye(c)[(rng.integers(c) + 1) % c]  # every expert sure and wrong: the floor applies
    answer = rng.integers(0, c, n)
    answer[0] = (probs[0, 0].argmax() + 1) % c
    gate = rng.dirichlet(np.ones(k), n)
    masks = evaluation.all_masks(k)
    loss = gating.subset_loss(gate, probs, answer, masks)
    acc = gating.subset_accuracy(gate, probs, answer, masks)
    for i, m in enumerate(masks):
        want_loss, want_acc = _naive_loss_and_acc(gate, probs, answer, m)
        assert loss[i] == pytest.approx(want_loss, rel=1e-10)
        np.testing.assert_equal(acc[i], want_acc)
    assert loss[0] == np.inf and np.isnan(acc[0])
    assert gating.subset_loss(gate, probs, answer, masks[5]) == pytest.approx(loss[5])


def test_subset_loss_is_fast_for_256_masks_5000_prompts_8_experts():
    rng = np.random.default_rng(1)
    n, k = 5000, 8
    probs = rng.dirichlet(np.ones(4), (n, k))
    answer = rng.integers(0, 4, n)
    gate = rng.dirichlet(np.ones(k), n)
    masks = evaluation.all_masks(k)
    gating.subset_loss(gate, probs, answer, masks[:2])
    t0 = time.perf_counter()
    loss = gating.subset_loss(gate, probs, answer, masks)
    assert time.perf_counter() - t0 < 0.5
    assert loss.shape == (256,) and np.isfinite(loss[1:]).all()


def test_subset_loss_rejects_mismatched_shapes():
    gate = np.full((3, 2), 0.5)
    probs = np.full((3, 3, 4), 0.25)
    with pytest.raises(InputError, match="disagree"):
        gating.subset_loss(gate, probs, np.zeros(3, int), [True, True, False][:2])
    with pytest.raises(InputError, match="finite"):
        gating.subset_weights(np.array([[np.nan, 1.0]]), [True, True])


def test_all_masks_lists_every_subset_once():
    masks = evaluation.all_masks(4)
    assert masks.shape == (16, 4)
    assert len({tuple(m) for m in masks}) == 16
    assert {tuple(m) for m in masks} == set(itertools.product([False, True], repeat=4))


def test_load_detects_weights_changed_after_saving(synth, tmp_path):
    net = synth[-1]
    weights, _ = net.save(tmp_path / "g.safetensors")
    other = gating.GatingNetwork(**{**FAST, "seed": 1}).fit(*synth[:3])
    other_weights, _ = other.save(tmp_path / "o.safetensors")
    weights.write_bytes(other_weights.read_bytes())
    with pytest.raises(InputError, match="sha256"):
        gating.GatingNetwork.load(weights)


def test_subset_loss_rejects_answers_outside_the_letters():
    with pytest.raises(InputError) as err:
        gating.subset_loss(np.full((2, 2), 0.5), np.full((2, 2, 4), 0.25), np.array([0, 4]), [True, True])
    assert err.value.param == "answer"
