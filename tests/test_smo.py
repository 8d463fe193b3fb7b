"""Subset Monotonic Optimisation: exactness against exhaustive search, feasibility, bounds, input checks."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe2lib.core import smo
from moe2lib.errors import InputError

from conftest import examples

try:  # small matmuls are far slower with several BLAS threads on a busy 2-core machine
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(1):
            yield


# ------------------------------------------------------------------ monotone loss families

def coverage_loss(K, seed, n_items=30):
    """Integer-valued (many ties): minus the weight of the items covered by the subset."""
    rng = np.random.default_rng(seed)
    cover = rng.random((K, n_items)) < 0.25
    w = rng.integers(1, 4, n_items).astype(float)

    def loss(masks):
        covered = (masks.astype(np.int64) @ cover.astype(np.int64)) > 0
        return -(covered * w).sum(axis=1)
    return loss


def pattern_loss(K, seed, n_patterns=25):
    """A monotone but not submodular loss: the cheapest pattern (a set of experts) fully present."""
    rng = np.random.default_rng(seed)
    pats = rng.random((n_patterns, K)) < rng.uniform(0.1, 0.5, (n_patterns, 1))
    cost = rng.random(n_patterns)
    base = 1.0 + rng.random()
    single = rng.random(K) * 0.3

    def loss(masks):
        ok = ~((pats[None, :, :] & ~masks[:, None, :]).any(axis=2))  # pattern subset of mask
        best = np.where(ok, cost[None, :], base).min(axis=1)
        return best - 0.01 * (masks * single).sum(axis=1) / K
    return loss


def generic_loss(K, seed):
    """An arbitrary monotone loss: random values per subset, made monotone by a subset-min."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 6, 1 << K).astype(float) if seed % 2 else rng.random(1 << K)
    idx = np.arange(1 << K)
    for k in range(K):
        has = (idx >> k) & 1 == 1
        v[has] = np.minimum(v[has], v[idx[has] ^ (1 << k)])
    weights = 1 << np.arange(K)

    def loss(masks):
        return v[(masks.astype(np.int64) * weights).sum(axis=1)]
    return loss


def make_loss(kind, K, seed):
    if kind == "generic":
        return generic_loss(K, seed)
    if kind == "synthetic":
        return smo.synthetic_instance(K, seed, n_prompts=60)[0]
    if kind == "coverage":
        return coverage_loss(K, seed)
    return pattern_loss(K, seed)


def device_arrays(K, seed, zero_energy=False):
    rng = np.random.default_rng(seed + 1000)
    delay = rng.uniform(0.2, 3.0, K)
    energy = rng.uniform(1.0, 25.0, K)
    if zero_energy and K > 1:
        energy[rng.integers(0, K)] = 0.0
    return delay, energy


instances = st.fixed_dictionaries({
    "K": st.integers(1, 12),
    "seed": st.integers(0, 10_000),
    "kind": st.sampled_from(["synthetic", "coverage", "pattern", "generic"]),
    "dfrac": st.sampled_from([0.0, 0.3, 0.7, 1.0, math.inf]),
    "efrac": st.sampled_from([0.0, 0.05, 0.2, 0.35, 0.5, 0.8, 1.0, math.inf, "prefix"]),
    "zero_energy": st.booleans(),
    "integer_energy": st.booleans(),
    "heuristics": st.sampled_from(["auto", "none", "full"]),
    "branch_order": st.sampled_from(["energy", "index"]),
    "projections": st.sampled_from([0, 2]),
    "batch_size": st.sampled_from([1, 37, 256]),
})


def build(p):
    K = p["K"]
    delay, energy = device_arrays(K, p["seed"], p["zero_energy"])
    if p["integer_energy"]:  # sums land exactly on budgets
        energy = np.round(energy)
    D = math.inf if p["dfrac"] == math.inf else p["dfrac"] * delay.max()
    if p["efrac"] == "prefix":  # exactly the energy of some subset
        E = float(energy[: max(1, K // 2)].sum())
    else:
        E = math.inf if p["efrac"] == math.inf else p["efrac"] * energy.sum()
    return make_loss(p["kind"], K, p["seed"]), delay, energy, D, E


def assert_feasible(r, delay, energy, D, E):
    assert r.mask.shape == delay.shape and r.mask.dtype == bool
    if r.feasible:
        assert r.mask.any()
        assert smo.subset_delay(r.mask, delay) <= D
        assert smo.subset_energy(r.mask, energy) <= E
        assert r.delay == pytest.approx(smo.subset_delay(r.mask, delay))
        assert r.energy == pytest.approx(smo.subset_energy(r.mask, energy))
    else:
        assert not r.mask.any() and r.loss == math.inf


# ------------------------------------------------------------------ exactness

@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_smo_matches_exhaustive_and_beats_greedy(p):
    loss, delay, energy, D, E = build(p)
    ex = smo.exhaustive_subset(loss, delay, energy, D, E)
    r = smo.select_subset(loss, delay, energy, D, E, eps=0.0, batch_size=p["batch_size"],
                          heuristics=p["heuristics"], branch_order=p["branch_order"],
                          projections=p["projections"])
    g = smo.greedy_subset(loss, delay, energy, D, E)
    for res in (ex, r, g):
        assert_feasible(res, delay, energy, D, E)
    assert r.feasible == ex.feasible == g.feasible
    if not ex.feasible:
        return
    assert abs(r.loss - ex.loss) <= 1e-12
    assert float(loss(r.mask[None, :])[0]) == pytest.approx(r.loss, abs=1e-12)
    assert r.loss <= g.loss + 1e-12
    assert r.bound == pytest.approx(r.loss, abs=1e-12) and r.gap <= 1e-12
    assert not r.timed_out and r.status == "optimal"
    assert ex.bound == ex.loss


dr_instances = st.fixed_dictionaries({
    "K": st.integers(1, 12),
    "seed": st.integers(0, 10_000),
    "kind": st.sampled_from(["synthetic", "coverage"]),  # losses with diminishing returns
    "dfrac": st.sampled_from([0.3, 1.0, math.inf]),
    "efrac": st.sampled_from([0.0, 0.05, 0.2, 0.35, 0.5, 0.8, math.inf, "prefix"]),
    "zero_energy": st.booleans(),
    "integer_energy": st.booleans(),
    "heuristics": st.sampled_from(["auto", "none"]),
    "bounds": st.sampled_from(["marginals", "convex"]),
    "batch_size": st.sampled_from([1, 37, 256]),
})


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dr_instances)
def test_stronger_bounds_match_exhaustive(p):
    if p["bounds"] == "convex" and p["kind"] != "synthetic":
        p = {**p, "kind": "synthetic"}  # only the synthetic loss has a convex extension
    loss, delay, energy, D, E = build(p)
    ex = smo.exhaustive_subset(loss, delay, energy, D, E)
    r = smo.select_subset(loss, delay, energy, D, E, batch_size=p["batch_size"], heuristics=p["heuristics"],
                          bounds=p["bounds"])
    assert_feasible(r, delay, energy, D, E)
    assert r.feasible == ex.feasible
    if ex.feasible:
        assert abs(r.loss - ex.loss) <= 1e-12
        assert r.status == "optimal" and r.bound == pytest.approx(r.loss, abs=1e-12)


@pytest.mark.parametrize("bounds", ["marginals", "convex"])
@pytest.mark.parametrize("max_evaluations", [1, 10, 40])
def test_stronger_bounds_stopped_early_stay_below_the_optimum(bounds, max_evaluations):
    loss, delay, energy = smo.synthetic_instance(16, 3, n_prompts=100)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    ex = smo.exhaustive_subset(loss, delay, energy, D, E)
    r = smo.select_subset(loss, delay, energy, D, E, bounds=bounds, max_evaluations=max_evaluations,
                          heuristics="none")
    assert r.bound <= ex.loss + 1e-12 <= r.loss + 2e-12


@pytest.mark.parametrize("bounds", ["monotone", "marginals", "convex"])
def test_budget_sums_that_round_just_over_the_budget(bounds):
    # 0.1 + 0.2 = 0.30000000000000004 > 0.3: boxes whose fixed experts exceed E by a rounding error
    loss = smo.synthetic_instance(6, 5, n_prompts=40)[0]
    energy = np.array([0.1, 0.2, 0.3, 0.15, 0.05, 0.25])
    delay = np.ones(6)
    for E in (0.3, 0.45, 0.6):
        ex = smo.exhaustive_subset(loss, delay, energy, 1.0, E)
        r = smo.select_subset(loss, delay, energy, 1.0, E, bounds=bounds, heuristics="none")
        assert r.loss == pytest.approx(ex.loss, abs=1e-12) and r.bound <= ex.loss + 1e-12


def test_stronger_bounds_prune_more():
    loss, delay, energy = smo.synthetic_instance(24, 0, n_prompts=100)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    runs = {b: smo.select_subset(loss, delay, energy, D, E, bounds=b) for b in ("monotone", "marginals", "convex")}
    assert len({r.loss for r in runs.values()}) == 1
    assert all(r.status == "optimal" for r in runs.values())
    # measured: 29,402 / 4,951 / 1,296 distinct subsets evaluated
    assert runs["marginals"].evaluations * 3 < runs["monotone"].evaluations
    assert runs["convex"].evaluations * 10 < runs["monotone"].evaluations


def test_convex_bound_certifies_k64():
    loss, delay, energy = smo.synthetic_instance(64, 1, n_prompts=100)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    r = smo.select_subset(loss, delay, energy, D, E, eps=1e-3, time_limit=60, bounds="convex")
    assert r.status == "eps-optimal" and not r.timed_out and 0 <= r.gap <= 1e-3
    assert r.loss <= smo.greedy_subset(loss, delay, energy, D, E).loss + 1e-12


def test_convex_extension_of_the_synthetic_loss():
    loss = smo.synthetic_instance(6, 2, n_prompts=50)[0]
    masks = smo.int_to_masks(np.arange(1, 64), 6)
    val, grad = loss.relaxed(masks.astype(float))
    np.testing.assert_allclose(val, loss(masks), rtol=1e-12)  # equals the loss on 0/1 points
    x = np.random.default_rng(0).random((3, 6))
    v0, g0 = loss.relaxed(x)
    h = 1e-6
    fd = np.stack([(loss.relaxed(x + h * np.eye(6)[k])[0] - v0) / h for k in range(6)], axis=1)
    np.testing.assert_allclose(g0, fd, rtol=1e-4, atol=1e-7)
    y = np.random.default_rng(1).random((3, 6))  # convex: above every tangent plane
    assert (loss.relaxed(y)[0] >= v0 + (g0 * (y - x)).sum(1) - 1e-12).all()
    with pytest.raises(InputError):
        smo.SyntheticLoss(g=loss.g, p=loss.p, monotone=False).relaxed(x)


def test_fractional_knapsack_known_answer():
    values = np.array([[6.0, 10.0, 12.0, 5.0]])
    e = np.array([1.0, 2.0, 3.0, 4.0])
    items = np.array([[True, True, True, False]])
    total, x = smo._fractional_knapsack(values, e, items, np.array([5.0]), solution=True)
    assert total[0] == pytest.approx(6 + 10 + 12 * 2 / 3)  # ratios 6, 5, 4: the third takes 2/3
    np.testing.assert_allclose(x[0], [1, 1, 2 / 3, 0])
    assert smo._fractional_knapsack(values, e, items, np.array([-1.0]))[0] == -np.inf


def test_exact_on_synthetic_instances_with_realistic_budgets():
    for K in (8, 12):
        for seed in range(4):
            loss, delay, energy = smo.synthetic_instance(K, seed, n_prompts=100)
            for D, frac in ((1.0, 0.3), (2.0, 0.3), (math.inf, 0.5)):
                E = frac * energy[delay <= D].sum()
                ex = smo.exhaustive_subset(loss, delay, energy, D, E)
                r = smo.select_subset(loss, delay, energy, D, E)
                assert r.feasible == ex.feasible
                assert r.loss == ex.loss or abs(r.loss - ex.loss) <= 1e-12, (K, seed, D, frac)


def test_fewer_evaluations_than_exhaustive_at_k12():
    ratios = []
    for seed in range(8):
        loss, delay, energy = smo.synthetic_instance(12, seed, n_prompts=100)
        D = 2.0
        E = 0.35 * energy[delay <= D].sum()
        ex = smo.exhaustive_subset(loss, delay, energy, D, E)
        r = smo.select_subset(loss, delay, energy, D, E)
        assert abs(r.loss - ex.loss) <= 1e-12
        ratios.append(r.evaluations / ex.evaluations)
    assert np.mean(ratios) < 1.0


def test_eps_optimal_within_eps():
    loss, delay, energy = smo.synthetic_instance(16, 3, n_prompts=100)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    ex = smo.exhaustive_subset(loss, delay, energy, D, E)
    for eps in (1e-3, 1e-2, 0.1):
        r = smo.select_subset(loss, delay, energy, D, E, eps=eps)
        assert r.loss <= ex.loss + eps + 1e-12
        assert r.bound <= ex.loss + 1e-12
        assert r.gap <= eps + 1e-12


# ------------------------------------------------------------------ limits: certified bounds

@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize("limit", [{"max_evaluations": 1}, {"max_evaluations": 20},
                                   {"max_evaluations": 60}, {"max_evaluations": 150},
                                   {"time_limit": 0.0}])
def test_stopped_early_returns_a_certified_bound(limit, seed):
    loss, delay, energy = smo.synthetic_instance(14, seed, n_prompts=100)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    ex = smo.exhaustive_subset(loss, delay, energy, D, E)
    r = smo.select_subset(loss, delay, energy, D, E, **limit)
    assert r.feasible
    assert_feasible(r, delay, energy, D, E)
    if limit.get("max_evaluations", 1) < 60:
        assert r.timed_out
    if r.timed_out:
        assert r.status in ("time_limit", "max_evaluations")
    else:
        assert r.loss == pytest.approx(ex.loss, abs=1e-12)
    assert r.bound <= ex.loss + 1e-12 <= r.loss + 2e-12
    assert r.gap == pytest.approx(r.loss - r.bound)


def test_more_than_64_experts():
    loss, delay, energy = smo.synthetic_instance(70, 0, n_prompts=30)
    D, E = math.inf, 40.0
    r = smo.select_subset(loss, delay, energy, D, E, time_limit=0.5)
    assert_feasible(r, delay, energy, D, E)
    assert r.feasible and r.bound <= r.loss


def test_time_limit_on_a_large_instance_is_anytime():
    loss, delay, energy = smo.synthetic_instance(48, 1, n_prompts=50)
    D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
    r = smo.select_subset(loss, delay, energy, D, E, eps=1e-3, time_limit=0.5)
    assert r.feasible and r.elapsed_s < 5
    g = smo.greedy_subset(loss, delay, energy, D, E)
    assert r.loss <= g.loss + 1e-12
    assert r.bound <= r.loss


# ------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("fn", [smo.select_subset, smo.exhaustive_subset, smo.greedy_subset])
def test_budgets_nothing_fits(fn):
    loss, delay, energy = smo.synthetic_instance(6, 0, n_prompts=20)
    for D, E in ((0.0, 100.0), (10.0, 0.5 * energy.min()), (0.5 * delay.min(), math.inf)):
        r = fn(loss, delay, energy, D, E)
        assert r.feasible is False and not r.mask.any() and r.loss == math.inf
        assert r.evaluations == 0


def test_everything_fits_takes_all_allowed_experts():
    loss, delay, energy = smo.synthetic_instance(10, 2, n_prompts=30)
    r = smo.select_subset(loss, delay, energy, math.inf, math.inf)
    assert r.mask.all() and r.evaluations == 1 and r.gap == 0
    D = np.median(delay)
    r = smo.select_subset(loss, delay, energy, D, math.inf)
    assert np.array_equal(r.mask, delay <= D)


def test_single_expert_and_zero_energy():
    loss = lambda m: -m.sum(axis=1).astype(float)  # noqa: E731
    r = smo.select_subset(loss, [1.0], [2.0], 1.0, 2.0)
    assert r.mask.tolist() == [True] and r.loss == -1
    r = smo.select_subset(loss, [1.0, 1.0, 1.0], [0.0, 5.0, 5.0], 1.0, 5.0)
    assert r.mask.tolist()[0] and r.mask.sum() == 2


def test_memo_counts_distinct_subsets_batches_and_never_the_empty_set():
    base, delay, energy = smo.synthetic_instance(12, 5, n_prompts=50)
    seen, calls = [], []

    def loss(m):
        calls.append(m.shape[0])
        seen.extend(smo.masks_to_int(m))
        return base(m)
    r = smo.select_subset(loss, delay, energy, 2.0, 0.3 * energy.sum(), batch_size=16)
    assert max(calls) <= 16
    assert len(seen) == len(set(seen)) == r.evaluations
    assert 0 not in seen


def test_non_monotone_loss_still_feasible():
    for seed in range(4):
        loss, delay, energy = smo.synthetic_instance(10, seed, n_prompts=80, monotone=False)
        D, E = 2.0, 0.3 * energy[delay <= 2.0].sum()
        ex = smo.exhaustive_subset(loss, delay, energy, D, E)
        r = smo.select_subset(loss, delay, energy, D, E)
        assert_feasible(r, delay, energy, D, E)
        assert r.loss >= ex.loss - 1e-12 and np.isfinite(r.loss)


def test_synthetic_instance_is_seeded_and_monotone():
    l1, d1, e1 = smo.synthetic_instance(9, 4)
    l2, d2, e2 = smo.synthetic_instance(9, 4)
    assert np.array_equal(d1, d2) and np.array_equal(e1, e2)
    masks = smo.int_to_masks(np.arange(1, 1 << 9), 9)
    np.testing.assert_array_equal(l1(masks), l2(masks))
    assert np.allclose(l1.g.sum(axis=1), 1) and (l1.g > 0).all()
    vals = l1(masks)
    lookup = np.concatenate([[np.inf], vals])
    for k in range(9):  # adding expert k never increases the loss
        with_k = np.arange(1, 1 << 9)
        with_k = with_k[(with_k >> k) & 1 == 0]
        assert (lookup[with_k | (1 << k)] <= lookup[with_k] + 1e-12).all()
    nm = smo.synthetic_instance(9, 4, monotone=False)[0]
    assert nm(np.zeros((1, 9), dtype=bool))[0] == np.inf


def test_helpers():
    m = np.array([[True, False, True], [False, False, False]])
    np.testing.assert_array_equal(smo.subset_delay(m, [1.0, 5.0, 2.0]), [2.0, 0.0])
    np.testing.assert_array_equal(smo.subset_energy(m, [1.0, 5.0, 2.0]), [3.0, 0.0])
    assert smo.subset_delay(m[0], [1.0, 5.0, 2.0]) == 2.0
    assert smo.masks_to_int(m) == [5, 0]
    np.testing.assert_array_equal(smo.int_to_masks([5, 0], 3), m)
    big = np.random.default_rng(0).random((4, 70)) < 0.5
    np.testing.assert_array_equal(smo.int_to_masks(smo.masks_to_int(big), 70), big)


# ------------------------------------------------------------------ bad input

GOOD = dict(delay=[1.0, 2.0], energy=[3.0, 4.0], delay_budget=2.0, energy_budget=5.0)


def _loss(m):
    return -m.sum(axis=1).astype(float)


@pytest.mark.parametrize("fn", [smo.select_subset, smo.exhaustive_subset, smo.greedy_subset])
@pytest.mark.parametrize("change,param", [
    ({"energy": [3.0, -1.0]}, "energy"),
    ({"energy": [3.0, np.nan]}, "energy"),
    ({"energy": [3.0]}, "energy"),
    ({"energy": [[3.0, 4.0]]}, "energy"),
    ({"delay": [[1.0, 2.0]]}, "delay"),
    ({"delay": []}, "delay"),
    ({"delay": [1.0, np.inf]}, "delay"),
    ({"delay": [-1.0, 2.0]}, "delay"),
    ({"delay_budget": float("nan")}, "delay_budget"),
    ({"energy_budget": float("nan")}, "energy_budget"),
    ({"energy_budget": -1.0}, "energy_budget"),
    ({"delay_budget": "soon"}, "delay_budget"),
])
def test_bad_input_names_the_parameter(fn, change, param):
    kw = {**GOOD, **change}
    with pytest.raises(InputError) as info:
        fn(_loss, kw["delay"], kw["energy"], kw["delay_budget"], kw["energy_budget"])
    assert info.value.param == param


@pytest.mark.parametrize("fn", [smo.select_subset, smo.exhaustive_subset, smo.greedy_subset])
@pytest.mark.parametrize("bad", [
    lambda m: np.zeros(m.shape[0] + 1),
    lambda m: np.zeros((m.shape[0], 2)),
    lambda m: np.full(m.shape[0], np.nan),
    lambda m: "x",
])
def test_bad_loss_raises(fn, bad):
    with pytest.raises(InputError) as info:
        fn(bad, **GOOD)
    assert info.value.param == "loss"


def test_exhaustive_refuses_large_k():
    K = smo.EXHAUSTIVE_MAX_K + 1
    with pytest.raises(InputError, match="too large") as info:
        smo.exhaustive_subset(_loss, np.ones(K), np.ones(K), 1.0, 3.0)
    assert info.value.param == "delay"


def test_bad_options():
    with pytest.raises(InputError) as info:
        smo.select_subset(_loss, **GOOD, eps=-1)
    assert info.value.param == "eps"
    with pytest.raises(InputError) as info:
        smo.select_subset(_loss, **GOOD, batch_size=0)
    assert info.value.param == "batch_size"
    with pytest.raises(InputError) as info:
        smo.select_subset(_loss, **GOOD, time_limit=float("nan"))
    assert info.value.param == "time_limit"
    with pytest.raises(InputError) as info:
        smo.select_subset(_loss, **GOOD, heuristics="sometimes")
    assert info.value.param == "heuristics"
    with pytest.raises(InputError) as info:
        smo.select_subset(_loss, **GOOD, bounds="tight")
    assert info.value.param == "bounds"
    with pytest.raises(InputError) as info:  # a plain function has no convex extension
        smo.select_subset(_loss, **GOOD, bounds="convex")
    assert info.value.param == "loss"


@pytest.mark.parametrize("fn", [smo.select_subset, smo.exhaustive_subset, smo.greedy_subset])
def test_unavailable_experts_are_never_selected(fn):
    loss, delay, energy = smo.synthetic_instance(10, 5, n_prompts=40)
    E = 0.5 * energy.sum()
    full = smo.exhaustive_subset(loss, delay, energy, math.inf, E)
    available = np.ones(10, dtype=bool)
    available[full.mask.nonzero()[0][0]] = False  # the optimum's first member goes down
    r = fn(loss, delay, energy, math.inf, E, available=available)
    assert r.feasible and not (r.mask & ~available).any()
    ref = smo.exhaustive_subset(loss, delay, energy, math.inf, E, available=available)
    if fn is not smo.greedy_subset:
        assert r.loss == pytest.approx(ref.loss) and ref.loss >= full.loss
    none = fn(loss, delay, energy, math.inf, E, available=np.zeros(10, dtype=bool))
    assert not none.feasible
    with pytest.raises(InputError, match="available"):
        fn(loss, delay, energy, math.inf, E, available=[1, 0])
