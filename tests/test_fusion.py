"""Fusion maths (eq. (29) over text, with eqs. (2), (26)–(28) of moe2lib.core.gating) on known answers and
invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2lib.core import fusion, gating
from moe2lib.errors import InputError

from conftest import examples

gates = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=8)
tokens = st.sampled_from(["a", "ab", "abc", " the", " t", "x", "\n", fusion.STOP])
tops = st.dictionaries(tokens, st.floats(1e-6, 1.0), min_size=1, max_size=6)


@settings(max_examples=examples(200), deadline=None)
@given(gates, st.data())
def test_subset_weights_sum_to_one_on_the_subset(g, data):
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(g), max_size=len(g))))
    w = gating.subset_weights(g, mask)
    if not mask.any():  # an empty subset has no weights, which fuse_text then refuses
        assert (w == 0).all()
        with pytest.raises(InputError, match="weights"):
            fusion.fuse_text(w, [{"a": 1.0}] * len(g))
        return
    assert np.isclose(w.sum(), 1.0)
    assert np.all(w[~mask] == 0) and np.all(w >= 0)
    g = np.asarray(g)
    if g[mask].sum() > 0:  # eq. (2): proportional to the gate on S
        np.testing.assert_allclose(w[mask] * g[mask].sum(), g[mask], rtol=1e-9, atol=1e-12)


@settings(max_examples=examples(200), deadline=None)
@given(gates, st.integers(1, 8), st.data())
def test_renormalising_after_a_drop_is_eq2_on_the_survivors(g, k, data):
    """Theorem 1: dropping an expert = eq. (2) on the survivors = the full weights renormalised."""
    g = np.asarray(g) + 0.01
    keep = gating.topk_mask(g, k)
    assert keep.sum() == min(k, len(g))
    assert g[keep].min() >= g[~keep].max(initial=-1)  # Top-k keeps the largest gating values
    w = gating.subset_weights(g, keep)
    drop = data.draw(st.sampled_from(list(np.flatnonzero(keep))))
    survivors = keep.copy()
    survivors[drop] = False
    if not survivors.any():
        return
    w2 = gating.subset_weights(g, survivors)
    np.testing.assert_allclose(w2, np.where(survivors, w, 0) / w[survivors].sum(), rtol=1e-9)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(tops, min_size=1, max_size=4), st.data(), st.sampled_from(fusion.REMAINDERS), st.booleans())
def test_fused_is_a_distribution_over_the_union(ts, data, remainder, prefix):
    g = data.draw(st.lists(st.floats(0.01, 5.0), min_size=len(ts), max_size=len(ts)))
    w = gating.subset_weights(g, [True] * len(ts))
    f = fusion.fuse_text(w, ts, remainder=remainder, prefix=prefix, vocab_sizes=[100] * len(ts))
    assert set(f.candidates) == set().union(*ts)
    assert np.isclose(f.probs.sum(), 1.0) and np.all(f.probs >= 0)
    if remainder == "drop" and not prefix:  # exactly (29) on the renormalised top-n lists, no extra normalising
        ref = {c: sum(wk * t.get(c, 0.0) / sum(t.values()) for wk, t in zip(w, ts)) for c in f.candidates}
        np.testing.assert_allclose(f.probs, [ref[c] for c in f.candidates], rtol=1e-9)


def test_known_answer_with_prefix_credit_and_uniform_remainder():
    smol = {" Paris": 0.6, " the": 0.2}
    gemma = {" Parisian": 0.3, " the": 0.5}
    w = [0.25, 0.75]
    f = fusion.fuse_text(w, [smol, gemma], prefix=False)
    p = dict(zip(f.candidates, f.probs))
    assert p[" Paris"] == pytest.approx(0.25 * 0.75)
    assert p[" the"] == pytest.approx(0.25 * 0.25 + 0.75 * 0.5 / 0.8)
    assert p[" Parisian"] == pytest.approx(0.75 * 0.3 / 0.8)
    # prefix credit: SmolLM2's " Paris" is its first step towards Gemma's " Parisian"
    f = fusion.fuse_text(w, [smol, gemma], prefix=True)
    s = {" Paris": 0.25 * 0.75, " the": 0.25 * 0.25 + 0.75 * 0.625, " Parisian": 0.25 * 0.75 + 0.75 * 0.375}
    total = sum(s.values())
    assert dict(zip(f.candidates, f.probs)) == pytest.approx({c: v / total for c, v in s.items()})
    # uniform remainder: a missing candidate gets (1 - mass) / (V - n)
    f = fusion.fuse_text(w, [smol, gemma], remainder="uniform", prefix=False, vocab_sizes=[12, 22])
    s = {" Paris": 0.25 * 0.6 + 0.75 * 0.2 / 20, " the": 0.25 * 0.2 + 0.75 * 0.5,
         " Parisian": 0.25 * 0.2 / 10 + 0.75 * 0.3}
    total = sum(s.values())
    assert dict(zip(f.candidates, f.probs)) == pytest.approx({c: v / total for c, v in s.items()})
    assert f.argmax() == " the"


def test_choose_argmax_and_seeded_sampling():
    f = fusion.fuse_text([1.0], [{"a": 0.7, "b": 0.2, "c": 0.1}])
    assert fusion.choose(f) == "a"
    draws = [fusion.choose(f, 1.0, np.random.default_rng(3)) for _ in range(3)]
    assert draws == [fusion.choose(f, 1.0, np.random.default_rng(3)) for _ in range(3)]
    rng = np.random.default_rng(0)
    counts = {c: 0 for c in "abc"}
    for _ in range(4000):
        counts[fusion.choose(f, 1.0, rng)] += 1
    assert counts["a"] / 4000 == pytest.approx(0.7, abs=0.03)
    # a low temperature sharpens towards the argmax
    assert sum(fusion.choose(f, 0.05, rng) == "a" for _ in range(200)) == 200


def test_bad_input_names_the_parameter():
    with pytest.raises(InputError, match="weights"):
        fusion.fuse_text([0.5], [{"a": 1.0}])
    with pytest.raises(InputError, match="remainder"):
        fusion.fuse_text([1.0], [{"a": 1.0}], remainder="spread")
    with pytest.raises(InputError, match="positive integer") as err:
        gating.topk_mask([1.0, 2.0], 0)
    assert err.value.param == "k"
    with pytest.raises(InputError, match="temperature"):
        fusion.choose(fusion.fuse_text([1.0], [{"a": 1.0}]), -1.0)


def test_extreme_numbers_found_by_fuzzing():
    """Regressions from tests/test_fuzz.py: each of these gave NaN, zero weights or a crash before."""
    # finite gates whose sum overflows: weights were all 0 (not a distribution); only that row is rescaled
    np.testing.assert_allclose(gating.subset_weights([1e308, 1e308], [True, True]), [0.5, 0.5])
    both = gating.subset_weights([[1e308, 1e308], [0.1, 0.7]], [True, True])
    assert both[0].tolist() == [0.5, 0.5] and both[1].tolist() == gating.subset_weights([0.1, 0.7], [1, 1]).tolist()
    # scaling uses the subset's own largest value (a huge gate outside S must not underflow the members)
    np.testing.assert_allclose(gating.subset_weights([9.4e-284, 3.8e40, 0.0], [True, False, True]), [1, 0, 0])
    # every weighted probability underflows: the fused distribution was NaN
    f = fusion.fuse_text([0.5, 0.5], [{"a": 5e-324}, {"a": 5e-324}], remainder="uniform", prefix=False)
    assert f.candidates == ["a"] and f.probs.tolist() == [1.0]
    # a tiny temperature: log p / T was -inf for every candidate, then NaN; now the argmax (ties: at random)
    f = fusion.fuse_text([1.0], [{"a": 0.3, "b": 0.7}])
    assert fusion.choose(f, 1e-310, np.random.default_rng(0)) == "b"
    for t in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="temperature"):
            fusion.choose(f, t)
    for bad in ({"a": float("inf")}, {"a": float("nan"), "b": 0.5}):
        with pytest.raises(InputError, match="top"):
            fusion.fuse_text([1.0], [bad])
    with pytest.raises(InputError, match="positive integer"):
        gating.topk_mask([1.0, 2.0], True)


def test_fuse_text_known_answer():
    tops = [{"a": 0.7, "b": 0.3}, {"b": 0.9, "c": 0.1}]
    fused = fusion.fuse_text([0.25, 0.75], tops, prefix=False)
    assert fused.candidates == ["a", "b", "c"]
    np.testing.assert_allclose(fused.probs, [0.175, 0.75, 0.075])
