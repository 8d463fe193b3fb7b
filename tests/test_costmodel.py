"""The cost model (eqs. 4-12): the roofline fit recovers known parameters, answer delays and per-class
costs have known values, a subset costs its slowest member's delay and the sum of the energies."""

import numpy as np
import pytest

from moe2lib.core import costmodel, devices
from moe2lib.errors import InputError

COST = costmodel.ModelCost("toy", params=1.0e8, weight_bytes=6.0e7, n_layer=12, attn_width=512, source="test")


def synthetic(F, B, c, lengths=(32, 64, 128, 256, 512), noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = costmodel.RooflineModel(COST)
    truth.flops_, truth.bandwidth_, truth.overhead_ = F, B, c
    kind = np.array(["prefill"] * len(lengths) + ["decode"] * len(lengths))
    L = np.array(list(lengths) * 2, dtype=float)
    t = truth.predict(kind, L) * np.exp(noise * rng.standard_normal(L.size))
    return kind, L, t, truth


def test_fit_recovers_known_roofline_parameters():
    # prefill compute-bound (L C / F > M / B), decode memory-bound: all three are identifiable
    F, B, c = 5e10, 1e10, 2e-3
    kind, L, t, _ = synthetic(F, B, c)
    m = costmodel.RooflineModel(COST, peak_flops=1e11, bandwidth=5e10).fit(kind, L, t)
    assert m.flops_ == pytest.approx(F, rel=1e-3)
    assert m.bandwidth_ == pytest.approx(B, rel=1e-3)
    assert m.overhead_ == pytest.approx(c, rel=1e-2)
    assert m.params()["eta_flops"] == pytest.approx(0.5, rel=1e-3)


def test_fit_with_noise_predicts_held_out_lengths():
    kind, L, t, truth = synthetic(5e10, 1e10, 2e-3, noise=0.03, seed=1)
    records = [dict(prompt_tokens=int(n), prefill_s=float(a), decode_s=float(b))
               for n, a, b in zip(L[:5], t[:5], t[5:])]
    dev = devices.Device("toy", "cpu", 1e11, 5e10, 10, 0, 10, None, "fp32")
    err = costmodel.heldout_errors(records, COST, dev)
    assert err.size == 10 and np.median(err) < 0.1
    m = costmodel.fit_records(records, COST, dev)
    assert m.flops_ == pytest.approx(5e10, rel=0.1)
    # with noise B and c trade off inside the decode time (c is small next to L C / F); their sum is fixed
    assert float(m.decode(128)) == pytest.approx(float(truth.decode(128)), rel=0.05)


def test_fit_needs_both_kinds():
    with pytest.raises(InputError):
        costmodel.RooflineModel(COST).fit(["prefill", "prefill"], [32, 64], [0.1, 0.2])


def test_answer_time_and_class_costs_known_answers():
    m = costmodel.RooflineModel(COST)
    m.flops_, m.bandwidth_, m.overhead_ = 1e11, 6e9, 0.0       # decode: max(2 ms, 10 ms) = 10 ms
    assert float(m.decode(0)) == pytest.approx(0.01, rel=1e-6)
    assert float(m.prefill(100)) == pytest.approx(COST.flops(100, 0) / 1e11)
    N = 5
    assert float(m.compute_time(100, N)) == pytest.approx(float(m.prefill(100)) + 4 * float(m.decode(102.5)))
    dev = devices.Device("lan", "gpu", 1e12, 1e11, 100, 10, 100, link_rate=1000.0, precision="x")
    L = np.array([50, 50, 200])
    D = np.array([1000, 1000, 4000])           # bytes: tau = 1 s, 1 s, 4 s
    out = costmodel.class_costs(m, dev, L, D, power_w=10.0, energy_source="estimated:test", report_tokens=[1])
    assert out["short"]["n_prompts"] == 2 and out["long"]["n_prompts"] == 1 and out["medium"]["n_prompts"] == 0
    assert out["short"]["delay_s"]["1"] == pytest.approx(1 + float(m.prefill(50)))
    assert out["long"]["energy_j"]["1"] == pytest.approx(10 * float(m.prefill(200)))
    assert out["medium"]["delay_s"]["1"] is None
    assert out["all"]["delay_s"]["1"] == pytest.approx(np.quantile([1 + float(m.prefill(50))] * 2
                                                                  + [4 + float(m.prefill(200))], 0.95))


def _doc(delays, energies):
    return {"answer_tokens": 1, "modes": {"m": {
        f"e{i}": {"device": "cpu-local", "classes": {"short": {"delay_s": {"1": d}, "energy_j": {"1": e}}}}
        for i, (d, e) in enumerate(zip(delays, energies))}}}


def test_subset_cost_is_max_delay_and_sum_energy():
    doc = _doc([0.5, 2.0, 1.0], [3.0, 7.0, 4.0])
    names = ["e0", "e1", "e2"]
    assert costmodel.subset_cost(doc, [True, False, True], "m", "short", names) == (1.0, 7.0)
    assert costmodel.subset_cost(doc, [True, True, True], "m", "short", names) == (2.0, 14.0)
    assert costmodel.subset_cost(doc, [False] * 3, "m", "short", names) == (0.0, 0.0)
    d, e = costmodel.cost_arrays(doc, "m", "short", ["e2", "e0"])
    assert d.tolist() == [1.0, 0.5] and e.tolist() == [4.0, 3.0]
    with pytest.raises(InputError, match="'huge'"):
        costmodel.cost_arrays(doc, "m", "huge", names)
    with pytest.raises(InputError, match="'e9'"):
        costmodel.cost_arrays(doc, "m", "short", ["e9"])
    with pytest.raises(InputError, match="'paper'"):
        costmodel.cost_arrays(doc, "paper", "short", names)


def test_paper_model_names_an_unknown_base_model():
    assert costmodel.paper_model("gemma3-270m").name == costmodel.PAPER_ROLE["gemma3-270m"]
    with pytest.raises(InputError, match="llama-70b"):
        costmodel.paper_model("llama-70b")
