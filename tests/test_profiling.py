
import numpy as np
import pytest

from moe2lib import devices, profiling
from moe2lib.experts import ExpertSpec, write_registry
from moe2lib.errors import InputError

COST = profiling.ModelCost("toy", params=1.0e8, weight_bytes=6.0e7, n_layer=12, attn_width=512, source="test")


def synthetic(F, B, c, lengths=(32, 64, 128, 256, 512), noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = profiling.RooflineModel(COST)
    truth.flops_, truth.bandwidth_, truth.overhead_ = F, B, c
    kind = np.array(["prefill"] * len(lengths) + ["decode"] * len(lengths))
    L = np.array(list(lengths) * 2, dtype=float)
    t = truth.predict(kind, L) * np.exp(noise * rng.standard_normal(L.size))
    return kind, L, t, truth


def test_fit_recovers_known_roofline_parameters():
    # prefill compute-bound (L C / F > M / B), decode memory-bound: all three are identifiable
    F, B, c = 5e10, 1e10, 2e-3
    kind, L, t, _ = synthetic(F, B, c)
    m = profiling.RooflineModel(COST, peak_flops=1e11, bandwidth=5e10).fit(kind, L, t)
    assert m.flops_ == pytest.approx(F, rel=1e-3)
    assert m.bandwidth_ == pytest.approx(B, rel=1e-3)
    assert m.overhead_ == pytest.approx(c, rel=1e-2)
    assert m.params()["eta_flops"] == pytest.approx(0.5, rel=1e-3)


def test_fit_with_noise_predicts_held_out_lengths():
    kind, L, t, truth = synthetic(5e10, 1e10, 2e-3, noise=0.03, seed=1)
    records = [dict(prompt_tokens=int(l), prefill_s=float(a), decode_s=float(b))
               for l, a, b in zip(L[:5], t[:5], t[5:])]
    dev = devices.Device("toy", "cpu", 1e11, 5e10, 10, 0, 10, None, "fp32")
    err = profiling.heldout_errors(records, COST, dev)
    assert err.size == 10 and np.median(err) < 0.1
    m = profiling.fit_records(records, COST, dev)
    assert m.flops_ == pytest.approx(5e10, rel=0.1)
    # with noise B and c trade off inside the decode time (c is small next to L C / F); their sum is fixed
    assert float(m.decode(128)) == pytest.approx(float(truth.decode(128)), rel=0.05)


def test_fit_needs_both_kinds():
    with pytest.raises(InputError):
        profiling.RooflineModel(COST).fit(["prefill", "prefill"], [32, 64], [0.1, 0.2])


def test_answer_time_and_class_costs_known_answers():
    m = profiling.RooflineModel(COST)
    m.flops_, m.bandwidth_, m.overhead_ = 1e11, 6e9, 0.0       # decode: max(2 ms, 10 ms) = 10 ms
    assert float(m.decode(0)) == pytest.approx(0.01, rel=1e-6)
    assert float(m.prefill(100)) == pytest.approx(COST.flops(100, 0) / 1e11)
    N = 5
    assert float(m.compute_time(100, N)) == pytest.approx(float(m.prefill(100)) + 4 * float(m.decode(102.5)))
    dev = devices.Device("lan", "gpu", 1e12, 1e11, 100, 10, 100, link_rate=1000.0, precision="x")
    L = np.array([50, 50, 200])
    D = np.array([1000, 1000, 4000])           # bytes: tau = 1 s, 1 s, 4 s
    out = profiling.class_costs(m, dev, L, D, power_w=10.0, energy_source="estimated:test", report_tokens=[1])
    assert out["short"]["n_prompts"] == 2 and out["long"]["n_prompts"] == 1 and out["medium"]["n_prompts"] == 0
    assert out["short"]["delay_s"]["1"] == pytest.approx(1 + float(m.prefill(50)))
    assert out["long"]["energy_j"]["1"] == pytest.approx(10 * float(m.prefill(200)))
    assert out["medium"]["delay_s"]["1"] is None
    assert out["all"]["delay_s"]["1"] == pytest.approx(np.quantile([1 + float(m.prefill(50))] * 2
                                                                  + [4 + float(m.prefill(200))], 0.95))


def test_paper_testbed_emulation_orders_devices_and_models():
    ones = np.array([110]), np.array([500])
    entries = {}
    for model in ("gemma3-270m", "smollm2-135m-instruct"):
        for dev in ("rtx4090", "jetson-agx-orin-64gb"):
            e = profiling.expert_profile_emulated(ExpertSpec("x", model, device=dev), devices.get(dev), *ones,
                                                  report_tokens=[1, 32])
            assert e["source"] == f"emulated:{dev}:{profiling.PAPER_ROLE[model]}"
            assert e["classes"]["all"]["energy_source"].startswith("estimated:")
            entries[model, dev] = e["classes"]["all"]
    # 7B decode on a 4090 ~ 4.68 GB / (0.65 x 1008 GB/s) + 0.5 ms ~ 7.6 ms per token
    d7 = entries["gemma3-270m", "rtx4090"]["delay_s"]
    assert (d7["32"] - d7["1"]) / 31 == pytest.approx(4.68e9 / (0.65 * 1008e9) + 0.5e-3, rel=0.02)
    for model in ("gemma3-270m", "smollm2-135m-instruct"):   # the Orin is slower
        assert entries[model, "jetson-agx-orin-64gb"]["delay_s"]["32"] > entries[model, "rtx4090"]["delay_s"]["32"]
    for dev in ("rtx4090", "jetson-agx-orin-64gb"):         # the 7B is slower than the 3B
        assert entries["gemma3-270m", dev]["delay_s"]["32"] > entries["smollm2-135m-instruct", dev]["delay_s"]["32"]
    with pytest.raises(InputError, match="llama-70b"):
        profiling.paper_model("llama-70b")


def _doc(delays, energies):
    return {"answer_tokens": 1, "modes": {"m": {
        f"e{i}": {"device": "cpu-local", "classes": {"short": {"delay_s": {"1": d}, "energy_j": {"1": e}}}}
        for i, (d, e) in enumerate(zip(delays, energies))}}}


def test_subset_cost_is_max_delay_and_sum_energy():
    doc = _doc([0.5, 2.0, 1.0], [3.0, 7.0, 4.0])
    names = ["e0", "e1", "e2"]
    assert profiling.subset_cost(doc, [True, False, True], "m", "short", names) == (1.0, 7.0)
    assert profiling.subset_cost(doc, [True, True, True], "m", "short", names) == (2.0, 14.0)
    assert profiling.subset_cost(doc, [False] * 3, "m", "short", names) == (0.0, 0.0)
    d, e = profiling.cost_arrays(doc, "m", "short", ["e2", "e0"])
    assert d.tolist() == [1.0, 0.5] and e.tolist() == [4.0, 3.0]
    with pytest.raises(InputError, match="'huge'"):
        profiling.cost_arrays(doc, "m", "huge", names)
    with pytest.raises(InputError, match="'e9'"):
        profiling.cost_arrays(doc, "m", "short", ["e9"])
    with pytest.raises(InputError, match="'paper'"):
        profiling.cost_arrays(doc, "paper", "short", names)


def test_load_profiles_checks_every_registered_expert(tmp_path):
    art = tmp_path / "artifacts"
    specs = [ExpertSpec("e0", "gemma3-270m", device="rtx4090"), ExpertSpec("e1", "smollm2-135m-instruct",
                                                                           device="jetson-agx-orin-64gb")]
    write_registry(art / "experts" / "experts.json", specs)
    entries = {s.name: profiling.expert_profile_emulated(s, devices.get(s.device), [100], [400],
                                                         report_tokens=[1]) for s in specs}
    path = art / "profiles" / "profiles.json"
    profiling.write_profiles(path, {"paper-testbed": entries}, answer_tokens=1, report_tokens=[1],
                             devices_used={})
    doc = profiling.load_profiles(path)                     # finds ../experts/experts.json itself
    assert set(doc["modes"]["paper-testbed"]) == {"e0", "e1"}
    d, _ = profiling.cost_arrays(doc, "paper-testbed", "all", specs)
    assert d[0] < d[1]          # 7B on the 4090 (~8 ms for 100 tokens) beats 3B on the Orin (~42 ms)
    del entries["e1"]
    profiling.write_profiles(path, {"paper-testbed": entries}, answer_tokens=1, report_tokens=[1], devices_used={})
    with pytest.raises(InputError, match="'e1'") as err:
        profiling.load_profiles(path)
    assert "profiles.json" in str(err.value)
    with pytest.raises(InputError, match="not found"):
        profiling.load_profiles(tmp_path / "nope.json")


def test_experts_sharing_base_and_rank_are_measured_once():
    specs = [ExpertSpec("a", "gemma3-270m"), ExpertSpec("b", "gemma3-270m"), ExpertSpec("c", "smollm2-135m-instruct")]
    groups = profiling.group_by_cost(specs)
    assert sorted(len(v) for v in groups.values()) == [1, 2]
    assert profiling.adapter_rank(None) is None


def test_gguf_cost_reads_the_packaged_model():
    from moe2lib import models
    c = profiling.gguf_cost(models.locate("smollm2-135m-instruct", "llm"))
    assert c.params == pytest.approx(134.5e6, rel=0.01) and 0.5 < c.weight_bytes / c.params < 1.0  # ~4-5 bit
    assert c.n_layer == 30 and c.attn_width == 576


@pytest.mark.slow
def test_real_measurement_prefill_grows_with_prompt_length():
    from moe2lib import data, energy
    texts = [data.format_prompt(q) for q in data.load_mmlu("dev")[:20]]
    meter = energy.make_meter("estimate", power_watts=8.0, how="test")
    records, cost = profiling.measure("smollm2-135m-instruct", None, [8, 128], texts, repetitions=1,
                                      decode_tokens=1, meter=meter, n_threads=1)
    assert [r["prompt_tokens"] for r in records] == [8, 128]
    pre = [r["prefill_s"] for r in records]
    assert all(p > 0 for p in pre) and pre[1] > pre[0]
    assert all(r["decode_s"] > 0 and r["energy_source"] == meter.source for r in records)
    assert records[0]["prefill_j"] == pytest.approx(8.0 * pre[0], rel=0.05)
    assert cost.n_layer == 30


def test_build_profiles_paper_testbed_uses_registry_devices_and_names_bad_input():
    prompts = ["Question: what is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" * k for k in (1, 3, 9)]
    specs = [ExpertSpec("big", "gemma3-270m", device="rtx4090"),
             ExpertSpec("small", "smollm2-135m-instruct", device="jetson-agx-orin-64gb")]
    modes, used = profiling.build_profiles(specs, prompts, [], modes=("paper-testbed",), report_tokens=[1, 32],
                                           progress=False, log=lambda *a: None)
    entries = modes["paper-testbed"]
    assert set(used) == {"rtx4090", "jetson-agx-orin-64gb"} and "measured" not in modes
    assert entries["big"]["source"] == "emulated:rtx4090:qwen2.5-7b-instruct-q4_k_m"
    assert entries["small"]["classes"]["all"]["n_prompts"] == 3
    # longer prompts cost more: the long class's worst case exceeds the short one's
    c = entries["small"]["classes"]
    assert c["long"]["delay_s"]["1"] > c["short"]["delay_s"]["1"] > 0
    with pytest.raises(InputError, match="'nodev'"):
        profiling.build_profiles([ExpertSpec("nodev", "gemma3-270m")], prompts, [], modes=("paper-testbed",),
                                 progress=False, log=lambda *a: None)
    with pytest.raises(InputError, match="'tpu-pod'"):
        profiling.build_profiles([ExpertSpec("x", "gemma3-270m", device="tpu-pod")], prompts, [],
                                 modes=("paper-testbed",), progress=False, log=lambda *a: None)
    with pytest.raises(InputError, match="'simulated'"):
        profiling.build_profiles(specs, prompts, [], modes=("simulated",), progress=False)


def test_modelled_energy_of_a_metered_expert_is_labelled_estimated():
    from moe2lib import devices
    from moe2lib.experts import ExpertSpec

    F, B, c = 5e10, 1e10, 2e-3
    kind, L, t, _ = synthetic(F, B, c)
    n = len(L) // 2
    records = [dict(prompt_tokens=int(L[i]), repetition=0, prefill_s=float(t[i]), decode_s=float(t[n + i]),
                    prefill_j=30 * float(t[i]), decode_j=30 * float(t[n + i]), energy_source="measured:zeus(gpu0)")
               for i in range(n)]
    entry = profiling.expert_profile_measured(ExpertSpec("e", "toy"), records, COST, devices.get("rtx4090"),
                                              np.array([40, 100, 200]), np.array([160, 400, 800]),
                                              report_tokens=[1], measured_as="e")
    assert entry["power_w"] == pytest.approx(30.0)
    assert all(c["energy_source"] == "estimated:fitted_busy_time*measured_power(measured:zeus(gpu0))"
               for c in entry["classes"].values())


def test_fit_figure_draws_without_a_held_out_error():
    import matplotlib
    matplotlib.use("Agg")
    from moe2lib import devices
    from moe2lib.experts import ExpertSpec

    kind, L, t, _ = synthetic(5e10, 1e10, 2e-3, lengths=(16, 64))
    records = [dict(prompt_tokens=int(L[i]), repetition=0, prefill_s=float(t[i]), decode_s=float(t[2 + i]),
                    prefill_j=0.0, decode_j=0.0, energy_source="estimated:test") for i in range(2)]
    entry = profiling.expert_profile_measured(ExpertSpec("e", "toy"), records, COST, devices.get("rtx4090"),
                                              np.array([40]), np.array([160]), report_tokens=[1], measured_as="e")
    assert entry["fit"]["heldout_median_rel_error"] is None  # two lengths: none can be held out
    fig = profiling.fit_figure({"modes": {"measured": {"e": entry}}}, "measured")
    assert "n/a" in fig.axes[0].get_legend_handles_labels()[1][0]
