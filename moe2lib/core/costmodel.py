"""The paper's cost model (eqs. 4-12, docs/method.md §2): what an expert's answer costs in delay and energy.

One llama.cpp step that processes ``n`` new tokens after ``ctx`` cached ones costs
``max(C(n, ctx)/F, M/B) + c``: ``C`` FLOPs (2 per weight per token, plus attention over the context), ``M``
bytes (every weight is read once per step), ``F``/``B`` the device's *effective* FLOP/s and bandwidth, ``c``
a constant overhead. The prompt is one step (prefill, ``n = L``); each further answer token is a step with
``n = 1`` (eq. 4). An N-token answer then takes (eqs. 5–6)

    T_k = D/r + prefill(L) + (N - 1) * t_k(L),

the paper's ``tau + N t`` with the first token's step being the prefill. ``C`` and ``M`` come from the
GGUF (:func:`moe2lib.models.profiling.gguf_cost`); ``F``, ``B`` and ``c`` are fitted to measured prefill and decode
times (:class:`RooflineModel`, measured by :mod:`moe2lib.models.profiling`), or — for the emulated paper testbed —
set from the device catalogue (peak x efficiency, overhead; :mod:`moe2lib.core.devices`). Per application class
the worst-case delay and expected energy (eqs. 8-12) are :func:`class_costs`; a subset's delay is the max
and its energy the sum over its members (eqs. 7, 10; :func:`subset_cost`).

Only numpy and scipy (the fit) are needed: no model is loaded here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from . import devices

# Application classes: MMLU zero-shot prompt length in tokens (each expert's own tokenizer); the
# default profile's sample splits roughly into thirds at these edges (median ~100 tokens).
APP_CLASSES = {"short": (0, 80), "medium": (80, 140), "long": (140, math.inf)}
QUANTILE = 0.95  # the worst case of an application class (eq. 9): this quantile of its delays


# ------------------------------------------------------------------------------------ model costs

@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model: parameters (2 FLOPs each), weight bytes, and the attention shape."""

    name: str
    params: float
    weight_bytes: float
    n_layer: int
    attn_width: int          # heads x head dimension (query side)
    source: str

    def flops(self, n_new, ctx=0):
        """FLOPs of one step over ``n_new`` new tokens after ``ctx`` cached ones (causal attention)."""
        n_new = np.asarray(n_new, dtype=float)
        ctx = np.asarray(ctx, dtype=float)
        attn = 4.0 * self.n_layer * self.attn_width * (n_new * ctx + n_new * (n_new + 1) / 2)
        return 2.0 * self.params * n_new + attn

    def to_dict(self) -> dict:
        return dict(name=self.name, params=self.params, weight_bytes=self.weight_bytes, n_layer=self.n_layer,
                    attn_width=self.attn_width, source=self.source)


# The paper's expert bases (Table I), from their published specs: Qwen2.5 technical report / model cards
# (parameters, layers, heads x 128 head dim) and the Q4_K_M GGUF's size (7B: 4.68 GB as published;
# 3B: its 3.09 B parameters at the 7B file's 4.92 bits per weight, an approximation).
PAPER_MODELS = {
    "qwen2.5-7b-instruct-q4_k_m": ModelCost("qwen2.5-7b-instruct-q4_k_m", 7.61e9, 4.68e9, 28, 28 * 128,
                                            "published:Qwen2.5-7B-Instruct-GGUF q4_k_m"),
    "qwen2.5-3b-instruct-q4_k_m": ModelCost("qwen2.5-3b-instruct-q4_k_m", 3.09e9, 3.09e9 * 4.92 / 8, 36, 16 * 128,
                                            "published:Qwen2.5-3B params; bytes at 4.92 bit/weight (approx.)"),
}
# Which paper model each stand-in plays (docs/method.md §6).
PAPER_ROLE = {"gemma3-270m": "qwen2.5-7b-instruct-q4_k_m", "smollm2-135m-instruct": "qwen2.5-3b-instruct-q4_k_m"}


def paper_model(base_model: str) -> ModelCost:
    if base_model not in PAPER_ROLE:
        raise InputError(f"no paper model is known for base model {base_model!r}; known: "
                         f"{', '.join(sorted(PAPER_ROLE))}", param="base_model")
    return PAPER_MODELS[PAPER_ROLE[base_model]]


# --------------------------------------------------------------------- the delay model (eqs. 4-6)

class RooflineModel:
    """Eqs. (4)–(6): step time ``max(C/F, M/B) + c``; ``fit`` estimates F, B, c from measured times.

    ``fit(kind, prompt_tokens, seconds)`` takes per-measurement arrays, ``kind`` "prefill" (time of the
    L-token prompt step) or "decode" (seconds per answer token after an L-token prompt). The fit is
    least squares on log times (relative errors), from several starts because of the max's kink.
    """

    def __init__(self, cost: ModelCost, peak_flops: float | None = None, bandwidth: float | None = None,
                 overhead_s: float | None = None):
        self.cost = cost
        self.peak_flops = peak_flops
        self.bandwidth = bandwidth
        self.overhead_s = overhead_s

    @classmethod
    def from_device(cls, cost: ModelCost, device: devices.Device) -> "RooflineModel":
        """The emulated model: peak x efficiency for F and B, the catalogue's overhead for c."""
        m = cls(cost)
        m.flops_, m.bandwidth_ = device.peak_flops * device.eta_flops, device.bandwidth * device.eta_bandwidth
        m.overhead_ = device.overhead_s
        return m

    def step(self, n_new, ctx=0):
        c = self.cost
        return np.maximum(c.flops(n_new, ctx) / self.flops_, c.weight_bytes / self.bandwidth_) + self.overhead_

    def prefill(self, prompt_tokens):
        return self.step(prompt_tokens, 0)

    def decode(self, prompt_tokens):
        return self.step(1, prompt_tokens)

    def predict(self, kind, prompt_tokens):
        kind = np.asarray(kind)
        return np.where(kind == "prefill", self.prefill(prompt_tokens), self.decode(prompt_tokens))

    def compute_time(self, prompt_tokens, answer_tokens: int = 1):
        """Busy time of an N-token answer: the prompt step and N - 1 decode steps (mid-answer context)."""
        L = np.asarray(prompt_tokens, dtype=float)
        return self.prefill(L) + (answer_tokens - 1) * self.decode(L + answer_tokens / 2)

    def fit(self, kind, prompt_tokens, seconds):
        from scipy.optimize import least_squares

        kind = np.asarray(kind)
        L = np.asarray(prompt_tokens, dtype=float)
        y = np.log(np.asarray(seconds, dtype=float))
        if np.any(~np.isfinite(y)) or not {"prefill", "decode"} <= set(kind.tolist()):
            raise InputError("the fit needs positive prefill and decode times", param="seconds")
        F0 = self.peak_flops or 1e10
        B0 = self.bandwidth or 1e10
        flops = np.where(kind == "prefill", self.cost.flops(L, 0), self.cost.flops(1, L))
        M = self.cost.weight_bytes

        def resid(theta):
            F, B, c = np.exp(theta)
            return np.log(np.maximum(flops / F, M / B) + c) - y

        t_min = float(np.exp(y.min()))
        lo = np.log([F0 * 1e-4, B0 * 1e-4, 1e-7])
        hi = np.log([F0 * 10, B0 * 100, max(t_min, 1e-6)])
        best = None
        for fF in (1.0, 0.1, 0.01):
            for fB in (1.0, 0.1, 0.01):
                for fc in (0.01, 0.3):
                    x0 = np.clip(np.log([F0 * fF, B0 * fB, t_min * fc]), lo + 1e-9, hi - 1e-9)
                    r = least_squares(resid, x0, bounds=(lo, hi), method="trf")
                    if best is None or r.cost < best.cost:
                        best = r
        self.flops_, self.bandwidth_, self.overhead_ = (float(v) for v in np.exp(best.x))
        self.rms_log_error_ = float(np.sqrt(np.mean(best.fun ** 2)))
        return self

    def params(self) -> dict:
        out = {"flops_per_s": self.flops_, "bytes_per_s": self.bandwidth_, "overhead_s": self.overhead_,
               "params": self.cost.params, "weight_bytes": self.cost.weight_bytes,
               "flops_per_token": 2.0 * self.cost.params, "bytes_per_token": self.cost.weight_bytes}
        if self.peak_flops:
            out["eta_flops"] = self.flops_ / self.peak_flops
        if self.bandwidth:
            out["eta_bandwidth"] = self.bandwidth_ / self.bandwidth
        return out


def medians(records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (kind, prompt length): the median measured seconds, as (kind, L, seconds) arrays."""
    rows = {}
    for r in records:
        rows.setdefault(("prefill", r["prompt_tokens"]), []).append(r["prefill_s"])
        rows.setdefault(("decode", r["prompt_tokens"]), []).append(r["decode_s"])
    keys = sorted(rows)
    return (np.array([k[0] for k in keys]), np.array([k[1] for k in keys], dtype=float),
            np.array([np.median(rows[k]) for k in keys]))


def fit_records(records, cost: ModelCost, device: devices.Device) -> RooflineModel:
    kind, L, s = medians(records)
    return RooflineModel(cost, device.peak_flops, device.bandwidth).fit(kind, L, s)


def heldout_errors(records, cost: ModelCost, device: devices.Device) -> np.ndarray:
    """Leave-one-prompt-length-out: |predicted / measured - 1| of the held-out medians (prefill, decode)."""
    kind, L, s = medians(records)
    errs = []
    for held in np.unique(L):
        train = L != held
        if len(np.unique(L[train])) < 2 or not {"prefill", "decode"} <= set(kind[train].tolist()):
            continue
        m = RooflineModel(cost, device.peak_flops, device.bandwidth).fit(kind[train], L[train], s[train])
        errs.extend(np.abs(m.predict(kind[~train], L[~train]) / s[~train] - 1))
    return np.array(errs)


# --------------------------------------------------- per application class and subset (eqs. 5-12)

def link_delay(prompt_bytes, device: devices.Device):
    """Eq. (5): tau = D / r (0 for co-located experts, ``link_rate`` None)."""
    b = np.asarray(prompt_bytes, dtype=float)
    return np.zeros_like(b) if device.link_rate is None else b / device.link_rate


def app_class_of(prompt_tokens, classes=APP_CLASSES) -> np.ndarray:
    L = np.asarray(prompt_tokens, dtype=float)
    out = np.full(L.shape, "", dtype=object)
    for name, (lo, hi) in classes.items():
        out[(L >= lo) & (L < hi)] = name
    return out


def class_costs(model: RooflineModel, device: devices.Device, prompt_tokens, prompt_bytes, *, power_w: float,
                energy_source: str, report_tokens: Sequence[int], jitter: float = 1.0,
                quantile: float = QUANTILE, classes=APP_CLASSES) -> dict:
    """Per application class: worst-case delay (the ``quantile`` over its prompts of T_k, times the
    measured run-to-run ``jitter``) and expected energy per prompt (busy time x power), per answer length."""
    L = np.asarray(prompt_tokens, dtype=float)
    tau = link_delay(prompt_bytes, device)
    cls = app_class_of(L, classes)
    out = {}
    for name, (lo, hi) in {"all": (0, math.inf), **classes}.items():
        sel = np.ones(L.shape, bool) if name == "all" else cls == name
        entry = {"prompt_tokens": [lo, None if math.isinf(hi) else hi], "n_prompts": int(sel.sum()),
                 "delay_s": {}, "energy_j": {}, "energy_source": energy_source}
        for N in report_tokens:
            if sel.any():
                busy = model.compute_time(L[sel], N)
                entry["delay_s"][str(N)] = float(np.quantile(tau[sel] + busy * jitter, quantile))
                entry["energy_j"][str(N)] = float(np.mean(busy) * power_w)
            else:
                entry["delay_s"][str(N)] = entry["energy_j"][str(N)] = None
        out[name] = entry
    return out


def model_of(entry: Mapping) -> RooflineModel:
    """The delay model stored in a profile entry (to draw or predict from)."""
    c = entry["model"]
    m = RooflineModel(ModelCost(c["name"], c["params"], c["weight_bytes"], c["n_layer"], c["attn_width"],
                                c["source"]))
    f = entry["fit"]
    m.flops_, m.bandwidth_, m.overhead_ = f["flops_per_s"], f["bytes_per_s"], f["overhead_s"]
    return m


def expert_names(experts) -> list[str]:
    """Names of ``experts``: names or objects with a ``name`` (ExpertSpecs); None: no experts."""
    return [e if isinstance(e, str) else e.name for e in experts or ()]


def cost_arrays(profiles: Mapping, mode: str, app_class: str, experts, answer_tokens: int | None = None):
    """(delay[K], energy[K]) of the named experts for :func:`moe2lib.core.smo.select_subset`: worst-case delay
    T_k and expected energy e_k of application class ``app_class`` for an ``answer_tokens``-token answer."""
    modes = profiles["modes"]
    if mode not in modes:
        raise InputError(f"unknown profile mode {mode!r}; known: {', '.join(modes)}", param="mode")
    N = str(profiles["answer_tokens"] if answer_tokens is None else answer_tokens)
    delay, energy = [], []
    for name in expert_names(experts):
        entry = modes[mode].get(name)
        if entry is None:
            raise InputError(f"profile mode {mode!r} has no entry for expert {name!r}", param="experts")
        classes = entry["classes"]
        if app_class not in classes:
            raise InputError(f"unknown application class {app_class!r}; known: {', '.join(classes)}",
                             param="app_class")
        c = classes[app_class]
        if N not in c["delay_s"]:
            raise InputError(f"no figures for {N}-token answers; have {', '.join(c['delay_s'])}",
                             param="answer_tokens")
        delay.append(c["delay_s"][N])
        energy.append(c["energy_j"][N])
    return np.array(delay, dtype=float), np.array(energy, dtype=float)


def subset_cost(profiles: Mapping, mask, mode: str, app_class: str, experts, answer_tokens: int | None = None):
    """(T_S, E_S) of the subset ``mask`` (bool over ``experts``): max delay (eq. 7), summed energy (eq. 10)."""
    from .smo import subset_delay, subset_energy

    d, e = cost_arrays(profiles, mode, app_class, experts, answer_tokens)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[-1] != d.size:
        raise InputError(f"mask has {mask.shape[-1]} entries for {d.size} experts", param="mask")
    return subset_delay(mask, d), subset_energy(mask, e)
