"""Testbed tables: Alg. 3 answers, budgets, random feasible subsets, Pareto fronts, rescaling."""

import math

import numpy as np
import pytest

from moe2lib.analysis import tables
from moe2lib.core import gating, smo
from moe2lib.errors import InputError


def synthetic_split(n, seed):
    """Three experts with a known best weighting (gating.synthetic_experts); the gate routes perfectly."""
    X, probs, answer, cluster = gating.synthetic_experts(n=n, seed=seed)
    gate = np.full((n, 3), 0.05)
    gate[np.arange(n), cluster] = 0.9
    return tables.Split(gate, probs, answer)


TRAIN, TEST = synthetic_split(300, 0), synthetic_split(300, 1)
DELAY = np.array([1.0, 2.0, 0.5])
ENERGY = np.array([10.0, 10.0, 2.0])


def test_moe2_routes_to_the_right_expert_and_beats_voting():
    both = np.array([True, True, False])
    assert (tables.moe2_answers(TEST, both, top_k=1) == TEST.answer).mean() == 1.0
    mv = (tables.majority_vote(TEST.probs, np.ones(3, bool)) == TEST.answer).mean()
    assert mv < 0.7


def test_budget_cell_picks_the_optimal_subset_and_respects_budgets():
    cell = tables.budget_cell(TRAIN, TEST, DELAY, ENERGY, math.inf, 20.0, top_k=2, n_random=30)
    assert cell.subset.tolist() == [True, True, False]  # the two specialists, 20 J
    assert cell.accuracy["MoE2"] == 1.0 and cell.accuracy["MoE2"] > cell.accuracy["SMO + M.V."]
    assert cell.smo_loss == pytest.approx(cell.exhaustive_loss)
    # delay 1.5 s drops expert 1: the best left is expert 0 + the uniform one
    cell = tables.budget_cell(TRAIN, TEST, DELAY, ENERGY, 1.5, 20.0, top_k=2, n_random=30)
    assert not cell.subset[1] and smo.subset_energy(cell.subset, ENERGY) <= 20.0
    nothing = tables.budget_cell(TRAIN, TEST, DELAY, ENERGY, 0.1, 20.0, n_random=5)
    assert not nothing.feasible and all(math.isnan(v) for v in nothing.accuracy.values())


def test_random_subsets_are_feasible_maximal_and_seeded():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        m = tables.random_feasible_subset(DELAY, ENERGY, 1.5, 12.0, rng)
        assert DELAY[m].max() <= 1.5 and ENERGY[m].sum() <= 12.0
        fits = [k for k in range(3) if not m[k] and DELAY[k] <= 1.5 and ENERGY[m].sum() + ENERGY[k] <= 12.0]
        assert fits == []  # maximal
        seen.add(tuple(m))
    assert seen == {(True, False, True)}
    a = tables.budget_cell(TRAIN, TEST, DELAY, ENERGY, math.inf, 12.0, n_random=10, seed=3)
    b = tables.budget_cell(TRAIN, TEST, DELAY, ENERGY, math.inf, 12.0, n_random=10, seed=3)
    assert a.accuracy == b.accuracy and a.random_std == b.random_std


def test_table_layout_and_markdown():
    table, cells = tables.testbed_table(TRAIN, TEST, DELAY, ENERGY, 2.0, [1.0, 12.0, 25.0], n_random=5)
    assert list(table.index) == list(tables.TABLE_METHODS) and list(table.columns) == ["1", "12", "25"]
    assert np.isnan(table["1"]).all() and table.loc["MoE2", "25"] == 100.0
    md = tables.markdown(table, "t")
    assert "| MoE2 | — | " in md and "100.0 |" in md


def test_pareto_front_known_answer():
    cost = [1, 2, 2, 3, 4, 5]
    acc = [0.5, 0.4, 0.7, 0.6, 0.7, 0.9]
    assert tables.pareto_front(cost, acc).tolist() == [0, 2, 5]


def test_all_subsets_and_rescaling():
    masks, d, e, acc = tables.all_subsets(TEST, DELAY, ENERGY, top_k=2)
    assert masks.shape == (7, 3) and np.allclose(d, smo.subset_delay(masks, DELAY))
    assert acc[np.flatnonzero((masks == [True, True, False]).all(1))[0]] == 1.0
    with pytest.raises(InputError):
        tables.all_subsets(TEST, np.ones(17), np.ones(17))
    d_b, e_b = tables.rescale_budgets([1.0, math.inf], [10.0], (DELAY, ENERGY), (2 * DELAY, ENERGY / 10))
    assert d_b == [2.0, math.inf] and e_b == [pytest.approx(1.0)]
    assert tables.delay_labels([1.0, 2.5, None, math.inf]) == ["1s", "2.5s", "relaxed", "relaxed"]


def test_load_splits_joins_by_qid_and_names_bad_files(tmp_path):
    from moe2lib.core.scores import Scores
    from moe2lib.infra import artifacts

    n = 6
    probs = np.full((n, 3, 4), 0.25)
    scores = Scores(probs, np.arange(n) % 4, np.array(["s"] * n), np.array([f"q{i}" for i in range(n)]),
                    np.ones((n, 3), int), np.array(["a", "b", "c"]))
    scores.save(tmp_path / "scores.npz")
    gate = np.tile([0.2, 0.3, 0.5], (n, 1))
    qid = np.array([f"q{i}" for i in (5, 0, 3, 1, 2, 4)])
    artifacts.write_npz(tmp_path / "gate.npz", qid=qid, gate=gate, train=np.array([1, 1, 1, 0, 0, 0], bool))
    train, test, experts = tables.load_splits(tmp_path / "scores.npz", tmp_path / "gate.npz")
    assert experts == ["a", "b", "c"] and train.answer.tolist() == [1, 0, 3] and test.answer.tolist() == [1, 2, 0]
    artifacts.write_npz(tmp_path / "gate.npz", qid=np.array(["zz"] * n), gate=gate, train=np.ones(n, bool))
    with pytest.raises(InputError, match="gate.npz"):
        tables.load_splits(tmp_path / "scores.npz", tmp_path / "gate.npz")


def test_cell_records_are_json_and_the_heatmap_draws(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from moe2lib.infra import artifacts

    table, cells = tables.testbed_table(TRAIN, TEST, DELAY, ENERGY, math.inf, [1.0, 25.0], n_random=3)
    records = tables.cell_records(cells, ["a", "b", "c"])
    assert records[0]["accuracy"]["MoE2"] is None and records[1]["subset"] == ["a", "b", "c"]
    artifacts.write_json(tmp_path / "m.json", {"t": {"delay_budget_s": None, "cells": records}})
    fig = tables.heatmap_figure({"t": {"delay_budget_s": None, "cells": records}})
    assert len(fig.axes) == 1


def test_table_loss_lookup_equals_the_direct_loss():
    fast = tables._with_table_loss(TRAIN, 3)
    masks = smo.int_to_masks(np.arange(1, 8), 3)
    assert np.allclose(fast.loss(masks), TRAIN.loss(masks))
    assert fast.loss(np.zeros((1, 3), bool))[0] == np.inf


def test_answer_energy_scale_keeps_each_budget_among_the_experts_costs():
    one = np.array([5.0, 7.5, 2.0, 3.5])
    assert tables.answer_energy_scale(one, 16 * one) == pytest.approx(16.0)
    assert tables.answer_energy_scale([1.0, 3.0], [10.0, 50.0]) == pytest.approx(15.0)  # 30 / 2
    for bad in (([0.0, 1.0], [1.0, 2.0]), ([1.0], [1.0, 2.0]), ([1.0], [math.nan])):
        with pytest.raises(InputError, match="energies"):
            tables.answer_energy_scale(*bad)


def test_reselection_latency_times_both_events():
    from moe2lib.core import smo

    loss, delay, energy = smo.synthetic_instance(8, 0, n_prompts=50)
    out = tables.reselection_latency(loss, delay, energy, 0.4 * float(energy.sum()), repetitions=5)
    assert set(out) == {"budget_change_ms", "expert_down_ms"}
    assert all(0 < v["median"] <= v["max"] < 5_000 for v in out.values())
    assert set(tables.reselection_latency(loss, delay, energy, 0.0, repetitions=2)) == {"budget_change_ms"}  # none down
