"""Profile experts on this machine's accelerator (or CPU) and write a profiles json (measured mode).

Used by ``benchmarks/gpu_profile.sh``; runs the same measurement and delay-model fit as the profiles
stage (``moe2lib.models.profiling.build_profiles``), with llama.cpp layers offloaded (``--n-gpu-layers``) and
energy from Zeus (NVML on a GPU, the INA3221 rails on a Jetson) where it reads a counter.

    python benchmarks/profile_device.py --device rtx4090 --n-gpu-layers -1 --meter zeus --out profiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe2lib.data import loaders
from moe2lib.models import energy, experts, profiling  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu-local", help="catalogue name of this machine's device "
                    "(rtx4090, jetson-agx-orin-64gb, cpu-local); its spec figures are the fit's reference")
    ap.add_argument("--experts", default=None, help="experts.json (default: the two base models, no adapter)")
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers on the GPU (-1: all)")
    ap.add_argument("--meter", default="auto", choices=["auto", *energy.METERS])
    ap.add_argument("--power-watts", type=float, default=None, help="busy power of the estimate (W)")
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--report-tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--n-questions", type=int, default=570, help="MMLU sample defining the prompt classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-threads", type=int, default=4)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="profiles_device.json")
    a = ap.parse_args(argv)

    if a.experts:
        specs = experts.read_registry(a.experts)
    else:
        specs = [experts.ExpertSpec(m, m, device=a.device) for m in a.models]
    if a.meter == "zeus" and not energy.ZeusMeter().available():
        print("zeus reads no energy counter here (NVML / RAPL / Jetson rails); use --meter auto", file=sys.stderr)
        return 2
    prompts = [loaders.format_prompt(q) for q in loaders.mmlu_sample(a.n_questions, a.seed, "test", a.data_dir)]
    texts = [loaders.format_prompt(q) for q in loaders.load_mmlu("dev", a.data_dir)]
    t0 = time.time()
    report = sorted({1, *a.report_tokens})
    modes, used = profiling.build_profiles(
        specs, prompts, texts, modes=("measured",), device=a.device, prompt_lengths=a.prompt_lengths,
        repetitions=a.repetitions, decode_tokens=a.decode_tokens, report_tokens=report, meter=a.meter,
        power_watts=a.power_watts, n_threads=a.n_threads, n_gpu_layers=a.n_gpu_layers, seed=a.seed)
    path = profiling.write_profiles(a.out, modes, answer_tokens=1, report_tokens=report, devices_used=used,
                                    decode_tokens=a.decode_tokens, prompt_lengths=a.prompt_lengths,
                                    repetitions=a.repetitions, n_gpu_layers=a.n_gpu_layers,
                                    wall_time_s=round(time.time() - t0, 1))
    for name, e in modes["measured"].items():
        c = e["classes"]["all"]
        print(f"{name:24s} {e['device']}: held-out error {100 * e['fit']['heldout_median_rel_error']:.1f}%, "
              f"T(N=1) p95 {c['delay_s']['1']:.4f} s, e {c['energy_j']['1']:.3f} J [{c['energy_source']}]")
    print(json.dumps({"out": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
