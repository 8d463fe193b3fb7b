import itertools

import matplotlib
import numpy as np
import pytest

from moe2lib.analysis import evaluation
from moe2lib.core import gating
from moe2lib.core.scores import align_rows
from moe2lib.core.stats import bootstrap_ci, bootstrap_means, relative_improvement, stratified_sample
from moe2lib.errors import InputError

matplotlib.use("Agg")


def _onehot(letters, c=4, sure=0.7):
    return (1 - sure) / c + sure * np.eye(c)[np.asarray(letters)]


def test_majority_vote_counts_votes_then_breaks_ties_by_summed_probability():
    # prompt 0: votes A, A, B -> A. prompt 1: votes A, B (tie); B has more probability -> B.
    probs = np.array([
        [[0.6, 0.4, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.9, 0, 0]],
        [[0.4, 0.3, 0.3, 0], [0.0, 0.95, 0.05, 0], [0.25, 0.25, 0.25, 0.25]],
    ])
    np.testing.assert_array_equal(evaluation.majority_vote(probs, [True, True, False]), [0, 1])
    np.testing.assert_array_equal(evaluation.majority_vote(probs), [0, 0])  # prompt 1: A gets the uniform vote too
    with pytest.raises(InputError, match="non-empty"):
        evaluation.majority_vote(probs, [False, False, False])


def test_best_expert_is_chosen_on_train_and_reported_on_test():
    answer = np.zeros(10, int)
    train = np.stack([_onehot([0] * 8 + [1] * 2), _onehot([0] * 6 + [1] * 4)], axis=1)  # expert 0 better
    test = np.stack([_onehot([1] * 10), _onehot([0] * 10)], axis=1)  # expert 1 better on test
    best = evaluation.best_expert(train, answer)
    assert best == 0
    gate = np.tile([0.2, 0.8], (10, 1))
    methods, singles = evaluation.correctness(test, answer, gate, best=best, top_k=1,
                                              base_probs=np.stack([_onehot([0] * 3 + [1] * 7)] * 2, 1)
                                              * 1, base_names=["s", "g"])
    assert methods["best_expert"].mean() == 0.0      # reported on test: wrong everywhere
    assert methods["router_top1"].mean() == 1.0      # the gate prefers expert 1
    assert methods["moe2"].mean() == 1.0             # 0.2 * wrong + 0.8 * right
    assert methods["average_expert"].mean() == 0.5
    assert methods["oracle"].mean() == 1.0
    assert methods["single_agent"].mean() == pytest.approx(0.3)
    assert set(singles) == {"s", "g"}
    assert list(methods) == [m for m in evaluation.METHODS if m != "generalist"]  # fig3_experiment adds it


def test_bootstrap_is_seeded_paired_and_near_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.5).astype(float)
    ci = bootstrap_ci(x, 2000, seed=1)[0]
    assert ci[0] < x.mean() < ci[1]
    se = np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 * se, rel=0.12)
    np.testing.assert_array_equal(ci, bootstrap_ci(x, 2000, seed=1)[0])
    assert not np.array_equal(ci, bootstrap_ci(x, 2000, seed=2)[0])
    np.testing.assert_allclose(bootstrap_ci(np.full(50, 0.7), 100)[0], [0.7, 0.7], atol=1e-12)
    # paired: the same resamples for every row, so identical rows give identical samples
    boot = bootstrap_means(np.stack([x, x, 1 - x]), 300, seed=3)
    np.testing.assert_array_equal(boot[0], boot[1])
    np.testing.assert_allclose(boot[0] + boot[2], 1.0)
    # resampled by indices instead of counts: the same bootstrap, other draws; a generator goes on drawing
    by_index = bootstrap_means(x, 2000, np.random.default_rng(1), resample="indices")
    assert by_index.shape == (1, 2000) and by_index.mean() == pytest.approx(x.mean(), abs=0.01)
    gen = np.random.default_rng(4)
    first, second = (bootstrap_means(x, 50, gen, resample="indices") for _ in range(2))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, bootstrap_means(x, 50, 4, resample="indices"))


def test_relative_improvement_is_the_papers_form():
    assert relative_improvement(0.572, 0.5) == pytest.approx(0.144)
    metrics = evaluation.fig3_metrics({"single_agent": np.r_[np.ones(50), np.zeros(50)],
                                       "majority_voting": np.r_[np.ones(60), np.zeros(40)],
                                       "moe2": np.r_[np.ones(75), np.zeros(25)]},
                                      {"base": np.r_[np.ones(50), np.zeros(50)]}, n_bootstrap=500, seed=0)
    imp = metrics["improvement"]
    assert imp["single_agent"]["relative"] == pytest.approx(0.5)
    assert imp["majority_voting"]["relative"] == pytest.approx(0.25)
    assert imp["single_agent"]["paper"] == 0.144 and imp["majority_voting"]["paper"] == 0.073
    lo, hi = imp["single_agent"]["ci95"]
    assert lo < 0.5 < hi and lo > 0  # nested correct sets: MoE2 is never worse in any resample
    assert metrics["accuracy"]["moe2"] == 0.75
    assert metrics["single_agents"]["base"]["accuracy"] == 0.5
    lo, hi = metrics["ci95"]["moe2"]
    assert 0.6 < lo < 0.75 < hi < 0.9


def test_paired_difference_intervals():
    """Nested correct sets: MoE2 - baseline is >= 0 in every resample; equal vectors differ by exactly 0."""
    same = np.r_[np.ones(40), np.zeros(60)]
    metrics = evaluation.fig3_metrics({"single_agent": same, "majority_voting": same.copy(),
                                       "moe2": np.r_[np.ones(55), np.zeros(45)]}, n_bootstrap=400, seed=1)
    d = metrics["differences"]
    assert d["moe2-single_agent"]["difference"] == pytest.approx(0.15)
    lo, hi = d["moe2-single_agent"]["ci95"]
    assert 0 < lo < 0.15 < hi and d["moe2-single_agent"]["p_le_0"] == 0.0
    assert set(d) == {"moe2-single_agent", "moe2-majority_voting"}  # pairs whose methods are present
    tie = evaluation.fig3_metrics({"moe2": same, "single_agent": same}, n_bootstrap=50)["differences"]
    assert tie["moe2-single_agent"]["ci95"] == [0.0, 0.0] and tie["moe2-single_agent"]["p_le_0"] == 1.0


def test_theorem2_check_counts_exactly_the_rising_pairs():
    # expert 0 always right, expert 1 always wrong, expert 2 half right: adding 1 or 2 to {0} raises the loss
    n = 40
    answer = np.zeros(n, int)
    probs = np.empty((n, 3, 4))
    probs[:, 0] = [0.97, 0.01, 0.01, 0.01]
    probs[:, 1] = [0.01, 0.97, 0.01, 0.01]
    probs[:, 2] = [0.5, 0.5, 0, 0]
    gate = np.tile([0.5, 0.25, 0.25], (n, 1))
    out = evaluation.theorem2_check(gate, probs, answer, n_chains=5, seed=0)
    masks = evaluation.all_masks(3)
    loss = gating.subset_loss(gate, probs, answer, masks)
    pairs = [(a, b) for a, b in itertools.product(range(1, 8), range(8)) if a != b and a & b == a]
    rises = [loss[b] - loss[a] for a, b in pairs]
    assert out["pairs"]["n"] == len(pairs) == 12  # 3^3 - 2^3 strict pairs, less the 7 with S = ∅
    assert out["pairs"]["share_rising"] == pytest.approx(np.mean(np.array(rises) > 1e-9))
    assert out["pairs"]["max_rise"] == pytest.approx(max(rises))
    assert out["steps"]["n"] == 9
    assert out["best_subset"]["experts"] == [0]
    assert np.array(out["chains"]["loss"]).shape == (5, 3)
    for order, row in zip(out["chains"]["orders"], out["chains"]["loss"]):
        assert row[0] == pytest.approx(loss[1 << order[0]])


def test_theorem2_holds_for_a_gate_that_knows_the_best_expert():
    # the ideal gating (weight 1 on an expert that is right) makes the fused loss monotone
    X, probs, answer, cluster = gating.synthetic_experts(100, 4, seed=0)
    gate = np.full((100, 3), 1e-6)
    gate[np.arange(100), cluster] = 1.0
    out = evaluation.theorem2_check(gate / gate.sum(1, keepdims=True), probs, answer, n_chains=3)
    assert out["best_subset"]["loss"] == pytest.approx(out["best_subset"]["full_set_loss"], abs=1e-4)
    assert out["pairs"]["max_rise"] < 1e-4


def test_theorem1_renormalised_gating_matches_a_gating_retrained_on_the_subset():
    X, probs, answer, _ = gating.synthetic_experts(300, 16, seed=2)
    tr, te = np.arange(200), np.arange(200, 300)

    def make():
        return gating.GatingNetwork(hidden=(32, 16), lr=1e-2, max_epochs=25, patience=8, seed=0)

    full = make().fit(X[tr], probs[tr], answer[tr])
    subsets = np.array([[True, True, False], [True, False, True], [False, False, True]])
    out = evaluation.theorem1_check(make, (X[tr], probs[tr], answer[tr]), (X[te], probs[te], answer[te]),
                                    full.predict_proba(X[tr]), full.predict_proba(X[te]), subsets)
    rows = {tuple(r["subset"]): r for r in out["subsets"]}
    # {0, 1}: both gatings route each cluster to its expert
    assert abs(rows[(0, 1)]["test_gap"]) < 0.05
    assert rows[(0, 1)]["test_acc_renormalised"] == rows[(0, 1)]["test_acc_retrained"] == 1.0
    # {0, 2}: expert 2 (uniform) is the best on cluster 1; both gatings find it
    assert abs(rows[(0, 2)]["test_gap"]) < 0.1
    assert rows[(2,)]["test_gap"] == 0.0  # one expert: nothing to learn
    assert out["summary"]["test"]["max_abs_gap"] < 0.1


def test_random_subsets_are_distinct_and_proper():
    s = evaluation.random_subsets(5, 8, seed=0)
    assert s.shape == (8, 5)
    assert len({tuple(r) for r in s}) == 8
    assert (s.sum(1) >= 2).all() and (s.sum(1) <= 4).all()
    assert evaluation.random_subsets(2, 5).tolist() == [[True, False], [False, True]]  # K=2: the singletons


def test_align_rows_joins_on_qid_and_names_a_missing_prompt():
    np.testing.assert_array_equal(align_rows(["b", "a"], ["a", "b", "c"]), [1, 0])
    with pytest.raises(InputError, match="'z'") as err:
        align_rows(["a", "z"], ["a", "b"], path="base.npz")
    assert err.value.path == "base.npz"


def test_figures_draw_from_metrics():
    rng = np.random.default_rng(0)
    methods = {m: (rng.random(50) < 0.5).astype(float) for m in evaluation.METHODS}
    metrics = evaluation.fig3_metrics(methods, {"a": methods["single_agent"]}, n_bootstrap=50)
    fig = evaluation.fig3_figure(metrics)
    assert len(fig.axes[0].patches) == len(evaluation.METHODS)  # 7 methods + 1 base model
    hist = [{"epoch": i, "train_loss": 1 / i, "val_loss": 1.1 / i, "lr": 1e-3} for i in range(1, 6)]
    assert evaluation.training_figure(hist, 3).axes
    X, probs, answer, _ = gating.synthetic_experts(30, 4)
    t2 = evaluation.theorem2_check(np.full((30, 3), 1 / 3), probs, answer, n_chains=2)
    t1 = {"subsets": [{"train_loss_renormalised": 1.0, "train_loss_retrained": 1.1,
                       "test_loss_renormalised": 1.2, "test_loss_retrained": 1.2}]}
    assert len(evaluation.theorems_figure(t1, t2).axes) == 2


def test_single_agent_is_the_base_model_chosen_on_train():
    answer = np.zeros(4, int)
    probs = np.stack([_onehot([0, 0, 0, 0]), _onehot([1, 1, 1, 1])], axis=1)
    gate = np.full((4, 2), 0.5)
    base = np.stack([_onehot([1, 1, 1, 1]), _onehot([0, 0, 0, 0])], axis=1)  # base 1 is right on test
    methods, _ = evaluation.correctness(probs, answer, gate, best=0, top_k=1, base_probs=base, best_base=0)
    assert methods["single_agent"].mean() == 0.0  # base 0 was chosen on train: its test score is reported
    methods, _ = evaluation.correctness(probs, answer, gate, best=0, top_k=1, base_probs=base, best_base=1)
    assert methods["single_agent"].mean() == 1.0
    with pytest.raises(InputError, match="best_base"):
        evaluation.correctness(probs, answer, gate, best=0, top_k=1, base_probs=base, best_base=2)


def test_temper_is_a_logit_temperature_and_keeps_padding():
    p = np.array([[[0.7, 0.2, 0.1, 0.0]]])
    z = np.log(p[0, 0, :3])
    want = np.exp(z / 0.5) / np.exp(z / 0.5).sum()
    np.testing.assert_allclose(evaluation.temper(p, 0.5)[0, 0, :3], want)
    assert evaluation.temper(p, 0.5)[0, 0, 3] == 0.0
    np.testing.assert_allclose(evaluation.temper(p, 1.0), p)


def test_fit_temperatures_recovers_the_generating_one():
    """Answers drawn from softmax(z / 2): the NLL-optimal temperature of softmax(z) is about 2."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 4))
    true = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    answer = np.array([rng.choice(4, p=row) for row in true])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    t = evaluation.fit_temperatures(p[:, None, :], answer)
    assert t.shape == (1,) and 1.7 < t[0] < 2.3


def test_fig3_experiment_routes_synthetic_experts_near_the_oracle():
    """Expert 0 knows task 1, expert 1 task 2: MoE2 is near the oracle and above voting and the base model."""
    from moe2lib.core.scores import Scores

    X, probs, answer, cluster = gating.synthetic_experts(n=400, seed=3)
    n = len(answer)
    qid = np.array([f"q{i}" for i in range(n)])
    E = Scores(probs, answer, np.where(cluster == 0, "task1", "task2"), qid, np.ones((n, 3), int),
               np.array(["e0", "e1", "e2"]))
    B = Scores(probs[:, 2:], answer, E.task, qid, np.ones((n, 1), int), np.array(["base"]))
    test = stratified_sample(E.task, 200, seed=0, remainder="random")
    train = np.setdiff1d(np.arange(n), test)
    run = evaluation.fig3_experiment(X, E, B, train, test, lambda: gating.GatingNetwork(max_epochs=60, seed=0),
                                     top_k=1, n_bootstrap=200)
    m = run["metrics"]
    assert m["accuracy"]["moe2"] >= 0.95 and m["accuracy"]["oracle"] == 1.0
    assert m["differences"]["moe2-majority_voting"]["ci95"][0] > 0.2
    assert m["differences"]["moe2-single_agent"]["ci95"][0] > 0.5
    assert set(m["per_task"]) == {"task1", "task2"} and m["n_test"] == 200


@pytest.mark.parametrize("k, where", [(1, "no nested pairs with K=1"), (3, "of nested pairs"), (11, "of chain steps")])
def test_theorems_figure_names_what_it_counted(k, where):
    rng = np.random.default_rng(0)
    gate = rng.dirichlet(np.ones(k), size=30)
    probs = rng.dirichlet(np.ones(4), size=(30, k))
    answer = rng.integers(0, 4, 30)
    t2 = evaluation.theorem2_check(gate, probs, answer, n_chains=3)
    assert ("pairs" in t2) == (k <= 10)
    fig = evaluation.theorems_figure({"subsets": []}, t2)
    assert where in fig.axes[1].get_title()


def test_specialists_beat_a_generalist_and_reach_the_oracle():
    """Expert 0 knows task 0, expert 1 task 1; one generalist is right on 70% of both; the base is uniform.
    The gating routes each task to its expert: MoE2 is near the oracle and above the generalist."""
    from moe2lib.core.scores import Scores

    X, probs, answer, task = gating.synthetic_experts(n=500, seed=3)
    n, c = len(answer), probs.shape[-1]
    rng = np.random.default_rng(0)
    knows = rng.random(n) < 0.7
    gen = np.where(knows[:, None], 0.85 * np.eye(c)[answer] + 0.15 / c, 0.85 * np.eye(c)[(answer + 1) % c] + 0.15 / c)

    def scores(p, names):
        return Scores(p, answer, np.array([f"t{t}" for t in task]), np.array([f"q{i}" for i in range(n)]),
                      np.ones(p.shape[:2], np.int32), np.array(names))

    E = scores(probs[:, :2], ["expert0", "expert1"])
    B = scores(np.full((n, 1, c), 1 / c), ["base"])
    G = scores(gen[:, None], ["generalist-base"])
    train, test = np.arange(300), np.arange(300, n)
    res = evaluation.fig3_experiment(X, E, B, train, test,
                                     lambda: gating.GatingNetwork(hidden=(16,), max_epochs=60, seed=0, n_threads=1),
                                     top_k=1, n_bootstrap=200, seed=0, generalist=G)
    acc = res["metrics"]["accuracy"]
    assert acc["oracle"] == 1.0 and acc["moe2"] >= 0.97 and acc["router_top1"] >= 0.97
    assert abs(acc["generalist"] - knows[test].mean()) < 1e-12  # the generalist's own accuracy, unchanged
    d = res["metrics"]["differences"]["moe2-generalist"]
    assert d["difference"] > 0.2 and d["ci95"][0] > 0
    assert res["metrics"]["generalist_model"] == "generalist-base"
    assert list(res["correct"]) == [m for m in evaluation.METHODS if m in res["correct"]]
