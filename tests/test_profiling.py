"""Profiling: the emulated and measured profile entries, profiles.json, llama.cpp measurement, figures."""

import numpy as np
import pytest
from test_costmodel import COST, synthetic

from moe2lib.core import costmodel, devices
from moe2lib.errors import InputError
from moe2lib.models import profiling
from moe2lib.models.experts import ExpertSpec, write_registry


def test_paper_testbed_emulation_orders_devices_and_models():
    ones = np.array([110]), np.array([500])
    entries = {}
    for model in ("gemma3-270m", "smollm2-135m-instruct"):
        for dev in ("rtx4090", "jetson-agx-orin-64gb"):
            e = profiling.expert_profile_emulated(ExpertSpec("x", model, device=dev), devices.get(dev), *ones,
                                                  report_tokens=[1, 32])
            assert e["source"] == f"emulated:{dev}:{costmodel.PAPER_ROLE[model]}"
            assert e["classes"]["all"]["energy_source"].startswith("estimated:")
            entries[model, dev] = e["classes"]["all"]
    # 7B decode on a 4090 ~ 4.68 GB / (0.65 x 1008 GB/s) + 0.5 ms ~ 7.6 ms per token
    d7 = entries["gemma3-270m", "rtx4090"]["delay_s"]
    assert (d7["32"] - d7["1"]) / 31 == pytest.approx(4.68e9 / (0.65 * 1008e9) + 0.5e-3, rel=0.02)
    for model in ("gemma3-270m", "smollm2-135m-instruct"):   # the Orin is slower
        assert entries[model, "jetson-agx-orin-64gb"]["delay_s"]["32"] > entries[model, "rtx4090"]["delay_s"]["32"]
    for dev in ("rtx4090", "jetson-agx-orin-64gb"):         # the 7B is slower than the 3B
        assert entries["gemma3-270m", dev]["delay_s"]["32"] > entries["smollm2-135m-instruct", dev]["delay_s"]["32"]


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
    d, _ = costmodel.cost_arrays(doc, "paper-testbed", "all", specs)
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
    from moe2lib.models import registry
    c = profiling.gguf_cost(registry.locate("smollm2-135m-instruct", "llm"))
    assert c.params == pytest.approx(134.5e6, rel=0.01) and 0.5 < c.weight_bytes / c.params < 1.0  # ~4-5 bit
    assert c.n_layer == 30 and c.attn_width == 576


@pytest.mark.slow
def test_real_measurement_prefill_grows_with_prompt_length():
    from moe2lib.data import loaders
    from moe2lib.models import energy
    texts = [loaders.format_prompt(q) for q in loaders.load_mmlu("dev")[:20]]
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
    from moe2lib.core import devices
    from moe2lib.models.experts import ExpertSpec

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
    from moe2lib.core import devices
    from moe2lib.models.experts import ExpertSpec

    kind, L, t, _ = synthetic(5e10, 1e10, 2e-3, lengths=(16, 64))
    records = [dict(prompt_tokens=int(L[i]), repetition=0, prefill_s=float(t[i]), decode_s=float(t[2 + i]),
                    prefill_j=0.0, decode_j=0.0, energy_source="estimated:test") for i in range(2)]
    entry = profiling.expert_profile_measured(ExpertSpec("e", "toy"), records, COST, devices.get("rtx4090"),
                                              np.array([40]), np.array([160]), report_tokens=[1], measured_as="e")
    assert entry["fit"]["heldout_median_rel_error"] is None  # two lengths: none can be held out
    fig = profiling.fit_figure({"modes": {"measured": {"e": entry}}}, "measured")
    assert "n/a" in fig.axes[0].get_legend_handles_labels()[1][0]
