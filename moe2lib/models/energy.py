"""Energy meters: measured (Zeus: NVML GPUs, RAPL CPUs, Jetson INA3221) or estimated (busy time x power).

Meters plug into ``METERS`` (name -> class). A meter opens named windows with ``begin(key)`` and closes
them with ``end(key)``, which returns a :class:`Reading`; every reading carries ``source``:
``"measured:<meter>"`` for a hardware counter, ``"estimated:<how>"`` otherwise (docs/method.md §6), so
no energy figure ever leaves this module without saying where it came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import InputError, ResourceUnavailable


@dataclass(frozen=True)
class Reading:
    """One closed window: energy (J), wall time (s) and where the energy figure came from."""

    energy_j: float
    time_s: float
    source: str


class EnergyMeter:
    """Base class: named begin/end windows; subclasses implement ``_begin``/``_end``."""

    name = "base"

    def __init__(self):
        self._open: dict[str, float] = {}

    @property
    def source(self) -> str:
        raise NotImplementedError

    def available(self) -> bool:
        return True

    def begin(self, key: str) -> None:
        if key in self._open:
            raise InputError(f"energy window {key!r} is already open", param="key")
        self._begin(key)  # first: a meter that fails to start leaves no window open
        self._open[key] = time.perf_counter()

    def end(self, key: str) -> Reading:
        if key not in self._open:
            raise InputError(f"energy window {key!r} was never begun", param="key")
        t0 = self._open.pop(key)
        energy = self._end(key)
        elapsed = time.perf_counter() - t0
        return Reading(float(energy if energy is not None else self._estimate(elapsed)), elapsed, self.source)

    def _begin(self, key):
        pass

    def _end(self, key) -> float | None:
        return None

    def _estimate(self, elapsed: float) -> float:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.source!r})"


METERS: dict[str, type[EnergyMeter]] = {}


def meter(name: str):
    def deco(cls):
        cls.name = name
        METERS[name] = cls
        return cls
    return deco


@meter("estimate")
class EstimateMeter(EnergyMeter):
    """Energy = busy wall time of the window x a stated power figure (``how`` says where it comes from)."""

    def __init__(self, power_watts: float, how: str = "stated power"):
        super().__init__()
        if not power_watts > 0:
            raise InputError(f"power must be positive, got {power_watts!r}", param="power_watts")
        self.power_watts = float(power_watts)
        self.how = how

    @property
    def source(self) -> str:
        return f"estimated:busy_time*{self.power_watts:g}W({self.how})"

    def _estimate(self, elapsed):
        return elapsed * self.power_watts


@meter("zeus")
class ZeusMeter(EnergyMeter):
    """Zeus ``ZeusMonitor`` over every readable GPU (NVML/AMD SMI), CPU package (RAPL) and SoC (Jetson).

    The window's energy is the sum over the sources it found (GPU + CPU package + DRAM, or the Jetson's
    total rail). ``available()`` is False when it found none (no GPU, no RAPL access): then ``begin``
    raises ResourceUnavailable instead of silently reporting 0 J.
    """

    def __init__(self, gpu_indices=None, cpu_indices=None):
        super().__init__()
        self.gpu_indices = gpu_indices
        self.cpu_indices = cpu_indices
        self._monitor = None
        self._parts: list[str] | None = None

    def _load(self):
        if self._monitor is None:
            try:
                from zeus.monitor import ZeusMonitor
            except ImportError:
                raise ResourceUnavailable("zeus is not installed: pip install zeus==0.16.0 "
                                          "-c constraints.txt") from None
            self._monitor = ZeusMonitor(gpu_indices=self.gpu_indices, cpu_indices=self.cpu_indices,
                                        approx_instant_energy=True)
            m = self._monitor
            parts = [f"gpu{i}" for i in m.gpu_indices] + [f"cpu{i}" for i in m.cpu_indices]
            if getattr(m, "soc_is_present", False):
                parts.append("soc")
            self._parts = parts
        return self._monitor

    def available(self) -> bool:
        try:
            self._load()
        except Exception:  # zeus raises various errors when a counter cannot be opened
            return False
        return bool(self._parts)

    @property
    def source(self) -> str:
        if self._parts is None:
            self.available()
        return f"measured:zeus({'+'.join(self._parts or ['none'])})"

    def _begin(self, key):
        if not self.available():
            raise ResourceUnavailable("zeus finds no readable energy counter here (no NVML GPU, no RAPL "
                                      "access, no Jetson rails); use the 'estimate' meter")
        self._monitor.begin_window(f"moe2:{key}", sync_execution=False)

    def _end(self, key):
        m = self._monitor.end_window(f"moe2:{key}", sync_execution=False)
        total = sum(m.gpu_energy.values())
        total += sum((m.cpu_energy or {}).values()) + sum((m.dram_energy or {}).values())
        soc = m.soc_energy
        if soc is not None:
            mj = getattr(soc, "total_energy_mj", None)
            if mj is None:
                mj = sum(v for k, v in vars(soc).items() if k.endswith("_mj") and v is not None)
            total += mj / 1000.0
        return total


def make_meter(name: str = "auto", *, power_watts: float | None = None, how: str = "stated power",
               **options) -> EnergyMeter:
    """A meter by name; ``auto`` takes Zeus where it reads a counter, else the estimate at ``power_watts``."""
    if name == "auto":
        z = ZeusMeter(**options)
        if z.available():
            return z
        name = "estimate"
    if name not in METERS:
        raise InputError(f"unknown energy meter {name!r}; known: auto, {', '.join(sorted(METERS))}",
                         param="meter")
    if name == "estimate":
        if power_watts is None:
            raise InputError("the estimate meter needs a power figure", param="power_watts")
        return EstimateMeter(power_watts, how)
    return METERS[name](**options)
