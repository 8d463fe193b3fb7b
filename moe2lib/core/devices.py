"""Device catalogue: the figures of the paper's delay model (4)–(6) for each edge server.

A :class:`Device` holds spec-sheet figures — peak FLOP/s ``F`` at the precision llama.cpp's quantised
matrix products run at, memory bandwidth ``B``, board power (TDP), idle power, link rate ``r`` — plus
the efficiencies and per-token overhead used when the device is only *emulated* (the paper's testbed,
Table I; no such hardware here). ``cpu-local`` is this machine, measured once (numpy STREAM-like copy
bandwidth and float32 GEMM FLOP/s at the given thread count) and cached under ``~/.cache/moe2/devices``.

Spec-sheet sources (figures as published by the vendor; dense, no sparsity):
- RTX 4090: NVIDIA Ada Lovelace whitepaper — 660.6 TOPS dense INT8 tensor (llama.cpp's MMQ kernels
  multiply quantised weights in INT8), 1008 GB/s GDDR6X, 450 W total board power.
- Jetson AGX Orin 64GB: NVIDIA Jetson AGX Orin data sheet — GPU 170 sparse INT8 TOPS (85 dense),
  204.8 GB/s LPDDR5, 15–60 W power modes (MAXN 60 W).
Idle power, link rates, efficiencies and overheads are *our assumptions* (the paper states none);
each is named in the entry's ``notes`` and every figure derived from them is marked emulated.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Device:
    """An edge server's figures for the roofline delay model and the energy estimate.

    ``peak_flops`` F (FLOP/s), ``bandwidth`` B (bytes/s), ``link_rate`` r (bytes/s; None: co-located,
    no transmission), ``tdp_w``/``idle_w`` (W), ``busy_w`` the power figure of the energy estimate
    (busy time x busy_w), and for emulation ``eta_flops``/``eta_bandwidth`` (achieved / peak) and
    ``overhead_s`` (the model's constant c per step). ``power_how`` says in a few words where ``busy_w``
    comes from; it goes into every estimated ``energy_source``.
    """

    name: str
    kind: str
    peak_flops: float
    bandwidth: float
    tdp_w: float
    idle_w: float
    busy_w: float
    link_rate: float | None
    precision: str
    eta_flops: float = 0.3
    eta_bandwidth: float = 0.6
    overhead_s: float = 1e-3
    source: str = "spec-sheet"
    power_how: str = "TDP"
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


GBPS = 1e9 / 8   # bytes/s in one Gbit/s

DEVICES: dict[str, Device] = {}


def register(device: Device) -> Device:
    DEVICES[device.name] = device
    return device


register(Device(
    "rtx4090", "gpu", peak_flops=660.6e12, bandwidth=1008e9, tdp_w=450.0, idle_w=20.0, busy_w=450.0,
    link_rate=1 * GBPS, precision="int8 tensor (dense)", eta_flops=0.3, eta_bandwidth=0.65, overhead_s=0.5e-3,
    power_how="rtx4090 TDP, upper bound",
    notes=("busy_w = TDP: an upper bound of the board power during inference (assumption)",
           "idle_w ~20 W: typical reported idle draw (assumption)",
           "link 1 Gbit/s Ethernet (assumption; the paper does not state its LAN)",
           "eta_bandwidth 0.65 ~ llama.cpp 7B Q4_K_M decode ~135 tok/s x 4.68 GB; eta_flops 0.3 ~ its "
           "prompt rate ~13k tok/s (public llama.cpp benchmarks; assumption)",
           "overhead 0.5 ms per step: kernel launches and sampling (assumption)")))
register(Device(
    "jetson-agx-orin-64gb", "soc", peak_flops=85e12, bandwidth=204.8e9, tdp_w=60.0, idle_w=10.0, busy_w=60.0,
    link_rate=1 * GBPS, precision="int8 tensor (dense GPU, half the 170 sparse TOPS)",
    eta_flops=0.18, eta_bandwidth=0.5, overhead_s=2e-3, power_how="jetson-agx-orin-64gb MAXN 60 W mode, upper bound",
    notes=("busy_w = MAXN power mode 60 W (upper bound, assumption)",
           "idle_w ~10 W (assumption)", "link 1 Gbit/s Ethernet (assumption)",
           "eta_bandwidth 0.5 ~ llama.cpp 7B Q4 decode ~22 tok/s; eta_flops 0.18 ~ prompt rate ~1k tok/s "
           "(public llama.cpp benchmarks; assumption)", "overhead 2 ms per step (assumption)")))

# Busy power of one CPU core for the estimate on this machine: a server CPU's TDP shared over its cores
# (EPYC: 200-360 W over 48-96 cores = 3.75-4.2 W per core). /proc/cpuinfo names no exact model here.
WATTS_PER_CORE = 4.0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """STREAM-like copy bandwidth (bytes/s): best of ``repeats`` numpy copies (read + write) of ``n_bytes``."""
    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def measure_flops(n: int = 1024, n_threads: int = 1, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s (2 n^3 per product; best of ``repeats``) with BLAS limited to ``n_threads``."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    best = np.inf
    with threadpool_limits(n_threads):
        x @ y
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _cache_path(n_threads: int):
    from ..infra import artifacts
    from ..infra.cache import cache_dir

    key = artifacts.digest({"cpu": _cpu_model(), "host": platform.node(), "threads": n_threads,
                            "numpy": np.__version__, "cores": os.cpu_count()})[:16]
    return cache_dir() / "devices" / f"cpu-local-{key}.json"


def local_cpu(n_threads: int = 1, *, refresh: bool = False) -> Device:
    """This machine as a device: bandwidth and GEMM FLOP/s measured once (a few seconds) and cached."""
    from ..infra import artifacts

    path = _cache_path(n_threads)
    if path.exists() and not refresh:
        m = json.loads(path.read_text(encoding="utf-8"))
    else:
        m = {"bandwidth": measure_bandwidth(), "peak_flops": measure_flops(n_threads=n_threads),
             "cpu": _cpu_model(), "n_threads": n_threads, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}
        artifacts.write_json(path, m)
    busy = WATTS_PER_CORE * n_threads
    return Device(
        "cpu-local", "cpu", peak_flops=float(m["peak_flops"]), bandwidth=float(m["bandwidth"]),
        tdp_w=busy, idle_w=0.0, busy_w=busy, link_rate=None, precision="float32 GEMM (numpy BLAS)",
        source=f"measured:{m['cpu']}, {n_threads} threads, {m['measured_at']}",
        power_how=f"cpu-local {n_threads} busy cores x {WATTS_PER_CORE:g} W/core server TDP share",
        notes=(f"busy_w = {n_threads} busy cores x {WATTS_PER_CORE} W/core (server TDP share; assumption)",
               "bandwidth: numpy copy, one thread; peak_flops: float32 GEMM at n_threads",
               "co-located experts: no transmission (link_rate None)"))


def get(name: str, *, n_threads: int = 1) -> Device:
    """A catalogue device by name; ``cpu-local`` is measured here. Unknown names raise InputError."""
    if name == "cpu-local":
        return local_cpu(n_threads)
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; known: {', '.join(known())}", param="device")
    return DEVICES[name]


def known() -> list[str]:
    return sorted([*DEVICES, "cpu-local"])


def with_power(device: Device, busy_w: float | None) -> Device:
    """The device with another busy-power figure for the energy estimate (None: unchanged)."""
    if busy_w is None:
        return device
    if not busy_w > 0:
        raise InputError(f"power must be positive, got {busy_w!r}", param="power_watts")
    return replace(device, busy_w=float(busy_w), power_how="power_watts parameter")
