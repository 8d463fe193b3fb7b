"""Device profiling: measured delay and energy of each expert, the paper's delay model (4)–(6), profiles.json.

The model (eqs. 4-12, docs/method.md §2). One llama.cpp step that processes ``n`` new tokens after ``ctx``
cached ones costs ``max(C(n, ctx)/F, M/B) + c``: ``C`` FLOPs (2 per weight per token, plus attention over the
context), ``M`` bytes (every weight is read once per step), ``F``/``B`` the device's *effective* FLOP/s
and bandwidth, ``c`` a constant overhead. The prompt is one step (prefill, ``n = L``); each further
answer token is a step with ``n = 1`` (eq. 4). An N-token answer then takes (eqs. 5–6)

    T_k = D/r + prefill(L) + (N - 1) * t_k(L),

the paper's ``tau + N t`` with the first token's step being the prefill. ``C`` and ``M`` come from the
GGUF (parameter count, bytes of the quantised tensors, layers, attention width); ``F``, ``B`` and ``c``
are fitted to measured prefill and decode times (:class:`RooflineModel`), or — for the emulated paper
testbed — set from the device catalogue (peak x efficiency, overhead; :mod:`moe2lib.devices`).

A subset's delay is the max and its energy the sum over its members (eqs. 7, 10; :func:`subset_cost`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import artifacts, devices, models
from .errors import InputError

PROFILE_MODES = ("measured", "paper-testbed")
# Application classes: MMLU zero-shot prompt length in tokens (each expert's own tokenizer); the
# default profile's sample splits roughly into thirds at these edges (median ~100 tokens).
APP_CLASSES = {"short": (0, 80), "medium": (80, 140), "long": (140, math.inf)}
QUANTILE = 0.95


# ----------------------------------------------------------------------------- model costs

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


def llama_cost(llm, name: str, source: str) -> ModelCost:
    """A loaded llama-cpp-python model's parameter count, tensor bytes, layers and attention width."""
    import llama_cpp

    md = llm.metadata
    arch = md["general.architecture"]
    heads = int(md[f"{arch}.attention.head_count"])
    width = int(md[f"{arch}.embedding_length"])
    head_dim = int(md.get(f"{arch}.attention.key_length", width // heads))
    mp = llm._model.model
    return ModelCost(name, float(llama_cpp.llama_model_n_params(mp)), float(llama_cpp.llama_model_size(mp)),
                     int(md[f"{arch}.block_count"]), heads * head_dim, source)


def gguf_cost(path, name: str | None = None) -> ModelCost:
    """:func:`llama_cost` of a GGUF file (memory-mapped by llama.cpp: fast, nothing is computed)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, verbose=False)
    try:
        return llama_cost(llm, name or Path(path).name, f"gguf:{Path(path).name}")
    finally:
        llm.close()


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


# ----------------------------------------------------------------------------- the delay model

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


# ----------------------------------------------------------------------------- measurement

def adapter_rank(path) -> int | None:
    """LoRA rank of a GGUF adapter (the smaller dimension of its ``*.lora_a`` tensors); None for no adapter."""
    if path is None:
        return None
    from gguf import GGUFReader

    ranks = {int(min(t.shape)) for t in GGUFReader(str(path), "r").tensors if t.name.endswith(".lora_a")}
    if not ranks:
        raise InputError("not a GGUF LoRA adapter (no *.lora_a tensors)", path=path)
    return max(ranks)


def cost_key(spec) -> tuple:
    """Experts with the same key cost the same: base model, backend and adapter rank (None: no adapter)."""
    return (spec.model, spec.backend, adapter_rank(spec.adapter))


def group_by_cost(specs) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for s in specs:
        groups.setdefault(cost_key(s), []).append(s)
    return groups


def load_llama(model: str, adapter: str | None = None, *, n_threads: int = 2, weights: str = "native",
               n_gpu_layers: int = 0, n_ctx: int = 2048):
    """llama-cpp-python as :class:`moe2lib.experts.LlamaCppExpert` loads it, plus GPU offload; (llm, bos)."""
    import llama_cpp

    path = models.locate(model, "llm") if weights == "native" else models.requantized(model, weights)
    if adapter is not None and not Path(adapter).is_file():
        raise InputError("LoRA adapter file not found", path=adapter)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, lora_path=adapter, n_gpu_layers=n_gpu_layers, verbose=False)
    bos = llm.token_bos() if _adds_bos(llm) else None
    return llm, bos, path


def _adds_bos(llm) -> bool:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` (as :func:`moe2lib.experts.gguf_add_bos`, without
    re-parsing the file: llama.cpp already read the header)."""
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def prompt_ids(llm, bos, texts: Sequence[str], length: int, start: int = 0) -> list[int]:
    """Exactly ``length`` token ids of real prompt text (BOS first where the model adds one)."""
    ids = [bos] if bos is not None else []
    i = start
    while len(ids) < length:
        ids += llm.tokenize(texts[i % len(texts)].encode("utf-8"), add_bos=False, special=False)
        i += 1
    return ids[:length]


def measure(model: str, adapter: str | None, prompt_lengths: Sequence[int], texts: Sequence[str], *,
            repetitions: int = 3, decode_tokens: int = 16, meter=None, n_threads: int = 2,
            weights: str = "native", n_gpu_layers: int = 0, seed: int = 0, progress=None) -> tuple[list, ModelCost]:
    """Time (and meter) the prompt step and ``decode_tokens`` greedy answer steps at each prompt length.

    Returns one record per (length, repetition): ``prompt_tokens``, ``prefill_s`` (time to first token),
    ``decode_s`` (seconds per further token), ``prefill_j``/``decode_j`` (J per prompt step / per token)
    and ``energy_source``; plus the model's :class:`ModelCost` (of the weights file actually run).
    """
    import llama_cpp

    if meter is None:
        from .energy import EstimateMeter
        meter = EstimateMeter(devices.WATTS_PER_CORE * n_threads,
                              f"{n_threads} busy cores x {devices.WATTS_PER_CORE:g} W/core server TDP share")
    llm, bos, path = load_llama(model, adapter, n_threads=n_threads, weights=weights, n_gpu_layers=n_gpu_layers,
                                n_ctx=max(prompt_lengths) + decode_tokens + 8)
    cost = llama_cost(llm, models.display_name(model) if weights == "native" else f"{model}:{weights}",
                      f"gguf:{Path(path).name}")
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(seed)
    records = []
    try:
        llm.reset()
        llm.eval(prompt_ids(llm, bos, texts, 16))          # warm-up: first-call allocations
        for rep in range(repetitions):
            for L in prompt_lengths:
                ids = prompt_ids(llm, bos, texts, int(L), start=int(rng.integers(len(texts))))
                llm.reset()
                meter.begin("prefill")
                t0 = time.perf_counter()
                llm.eval(ids)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), (n_vocab,))
                tok = int(np.argmax(logits))
                t1 = time.perf_counter()
                pre = meter.end("prefill")
                meter.begin("decode")
                t2 = time.perf_counter()
                for _ in range(decode_tokens):
                    llm.eval([tok])
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), (n_vocab,))
                    tok = int(np.argmax(logits))
                t3 = time.perf_counter()
                dec = meter.end("decode")
                records.append(dict(prompt_tokens=int(L), repetition=rep, prefill_s=t1 - t0,
                                    decode_s=(t3 - t2) / decode_tokens, prefill_j=pre.energy_j,
                                    decode_j=dec.energy_j / decode_tokens, energy_source=pre.source))
                if progress is not None:
                    progress.update(1)
    finally:
        llm.close()
    return records, cost


# ----------------------------------------------------------------------------- profiles

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


def expert_profile_measured(spec, records, cost: ModelCost, device: devices.Device, prompt_tokens, prompt_bytes,
                            *, report_tokens, measured_as: str) -> dict:
    """One expert's measured-mode entry: fit, held-out error, power, per-class costs and the raw records."""
    model = fit_records(records, cost, device)
    held = heldout_errors(records, cost, device)
    pre = np.array([r["prefill_s"] for r in records])
    dec = np.array([r["decode_s"] for r in records])
    kinds = ["prefill"] * len(records) + ["decode"] * len(records)
    Ls = [r["prompt_tokens"] for r in records] * 2
    ratio = np.concatenate([pre, dec]) / model.predict(kinds, Ls)
    jitter = float(max(1.0, np.quantile(ratio, QUANTILE)))
    energy = np.array([r["prefill_j"] for r in records] + [r["decode_j"] for r in records])
    busy = np.concatenate([pre, dec])
    power = float(energy.sum() / busy.sum())
    source = records[0]["energy_source"]
    if source.startswith("measured:"):  # the per-class figures are modelled busy time x the measured mean power
        source = f"estimated:fitted_busy_time*measured_power({source})"
    return {
        "device": device.name, "base_model": spec.model, "adapter": artifacts.portable_path(spec.adapter),
        "measured_as": measured_as,
        "source": f"measured:{device.name}", "model": cost.to_dict(),
        "fit": {**model.params(), "rms_log_error": model.rms_log_error_,
                "heldout_median_rel_error": float(np.median(held)) if held.size else None,
                "heldout_max_rel_error": float(np.max(held)) if held.size else None},
        "power_w": power, "jitter_p95": jitter,
        "classes": class_costs(model, device, prompt_tokens, prompt_bytes, power_w=power, energy_source=source,
                               report_tokens=report_tokens, jitter=jitter),
        "measurements": records,
    }


def expert_profile_emulated(spec, device: devices.Device, prompt_tokens, prompt_bytes, *, report_tokens,
                            power_w: float | None = None) -> dict:
    """The paper-testbed entry: the paper's model (Qwen2.5 7B/3B Q4_K_M) on the catalogue device, emulated."""
    cost = paper_model(spec.model)
    model = RooflineModel.from_device(cost, device)
    power = device.busy_w if power_w is None else power_w
    how = f"estimated:busy_time*{power:g}W({device.power_how if power_w is None else 'power_w argument'})"
    return {
        "device": device.name, "base_model": spec.model, "adapter": artifacts.portable_path(spec.adapter),
        "source": f"emulated:{device.name}:{cost.name}", "model": cost.to_dict(),
        "fit": {**model.params(), "eta_flops": device.eta_flops, "eta_bandwidth": device.eta_bandwidth,
                "note": "not fitted: catalogue peak x efficiency and overhead (devices.py)"},
        "power_w": power, "jitter_p95": 1.0,
        "classes": class_costs(model, device, prompt_tokens, prompt_bytes, power_w=power, energy_source=how,
                               report_tokens=report_tokens),
    }


def model_of(entry: Mapping) -> RooflineModel:
    """The delay model stored in a profile entry (to draw or predict from)."""
    c = entry["model"]
    m = RooflineModel(ModelCost(c["name"], c["params"], c["weight_bytes"], c["n_layer"], c["attn_width"],
                                c["source"]))
    f = entry["fit"]
    m.flops_, m.bandwidth_, m.overhead_ = f["flops_per_s"], f["bytes_per_s"], f["overhead_s"]
    return m


def write_profiles(path, modes: Mapping[str, Mapping[str, dict]], *, answer_tokens: int, report_tokens,
                   devices_used: Mapping[str, devices.Device], **extra) -> Path:
    doc = {
        "version": 1, "answer_tokens": int(answer_tokens), "report_tokens": [int(n) for n in report_tokens],
        "quantile": QUANTILE,
        "app_classes": {k: [lo, None if math.isinf(hi) else hi] for k, (lo, hi) in APP_CLASSES.items()},
        "app_class_basis": "MMLU zero-shot prompt length in tokens under each expert's base-model tokenizer; "
                           "'all' = every prompt",
        "delay_model": "T = D/r + prefill(L) + (N-1) t(L); step = max(C/F, M/B) + c (eqs. 4-6)",
        "devices": {k: d.to_dict() for k, d in devices_used.items()},
        "modes": {m: dict(v) for m, v in modes.items()}, **extra,
    }
    return artifacts.write_json(path, doc)


def _expert_names(experts) -> list[str]:
    if experts is None:
        return []
    if isinstance(experts, (str, Path)):
        from .experts import read_registry
        return [s.name for s in read_registry(experts)]
    return [e if isinstance(e, str) else e.name for e in experts]


def load_profiles(path, experts=None) -> dict:
    """Read profiles.json; every expert of ``experts`` (names, ExpertSpecs or an experts.json path; None:
    ``<artifacts>/experts/experts.json`` beside the profiles folder, if it exists) must be in every mode."""
    path = Path(path)
    if not path.exists():
        raise InputError("profiles file not found (run the profiles stage)", path=path)
    doc = artifacts.read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("modes"), dict) or not doc["modes"]:
        raise InputError("a profiles file is an object with a non-empty 'modes' mapping", path=path)
    if experts is None:
        guess = path.resolve().parent.parent / "experts" / "experts.json"
        experts = guess if guess.exists() else None
    names = _expert_names(experts)
    for mode, entries in doc["modes"].items():
        for name in names:
            if name not in entries:
                raise InputError(f"profile mode {mode!r} has no entry for expert {name!r}", path=path,
                                 param=f"modes.{mode}")
        for name, e in entries.items():
            for key in ("device", "classes"):
                if key not in e:
                    raise InputError(f"expert {name!r} lacks {key!r}", path=path, param=f"modes.{mode}.{name}")
    return doc


def cost_arrays(profiles: Mapping, mode: str, app_class: str, experts, answer_tokens: int | None = None):
    """(delay[K], energy[K]) of the named experts for :func:`moe2lib.smo.select_subset`: worst-case delay
    T_k and expected energy e_k of application class ``app_class`` for an ``answer_tokens``-token answer."""
    modes = profiles["modes"]
    if mode not in modes:
        raise InputError(f"unknown profile mode {mode!r}; known: {', '.join(modes)}", param="mode")
    N = str(profiles["answer_tokens"] if answer_tokens is None else answer_tokens)
    delay, energy = [], []
    for name in _expert_names(experts):
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


# ----------------------------------------------------------------------------- the stage

def prompt_token_counts(model: str, prompts: Sequence[str]) -> np.ndarray:
    """Token count of each prompt under a base model's tokenizer (BOS included where the model adds one)."""
    import llama_cpp

    path = models.locate(model, "llm")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        bos = int(_adds_bos(llm))
        return np.array([bos + len(llm.tokenize(p.encode("utf-8"), add_bos=False, special=False))
                         for p in prompts])
    finally:
        llm.close()


def build_profiles(specs, prompts: Sequence[str], texts: Sequence[str], *, modes=PROFILE_MODES,
                   device: str = "cpu-local", prompt_lengths=(32, 64, 128, 256, 512), repetitions: int = 3,
                   decode_tokens: int = 16, report_tokens=(1, 32), meter: str = "auto",
                   power_watts: float | None = None, n_threads: int = 2, weights: str = "native",
                   n_gpu_layers: int = 0, seed: int = 0, progress: bool = True, log=print):
    """Profile every expert: ``measured`` on ``device`` (one measurement per cost group, see
    :func:`cost_key`) and ``paper-testbed`` (emulated, each expert on its registry device).

    ``prompts`` are the application's prompts (their token lengths define the classes and the
    worst case), ``texts`` the text the measurement prompts are cut from. Returns (modes, devices used).
    """
    from .energy import make_meter

    unknown = [m for m in modes if m not in PROFILE_MODES]
    if unknown:
        raise InputError(f"unknown profile mode {unknown[0]!r}; known: {', '.join(PROFILE_MODES)}", param="mode")
    nbytes = np.array([len(p.encode("utf-8")) for p in prompts])
    lengths = {m: prompt_token_counts(m, prompts) for m in sorted({s.model for s in specs})}
    out, used = {}, {}
    if "measured" in modes:
        dev = devices.with_power(devices.get(device, n_threads=n_threads), power_watts)
        used[dev.name] = dev
        em = make_meter(meter, power_watts=dev.busy_w, how=dev.power_how)
        groups = group_by_cost(specs)
        log(f"measured on {dev.name} with {em.source}: {len(groups)} distinct (base, backend, adapter rank) "
            f"of {len(specs)} experts, each measured once")
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(groups) * len(prompt_lengths) * repetitions, desc="profiling")
        entries = {}
        for key, members in groups.items():
            rep = members[0]
            records, cost = measure(rep.model, rep.adapter, prompt_lengths, texts, repetitions=repetitions,
                                    decode_tokens=decode_tokens, meter=em, n_threads=n_threads, weights=weights,
                                    n_gpu_layers=n_gpu_layers, seed=seed, progress=bar)
            for s in members:
                entries[s.name] = expert_profile_measured(s, records, cost, dev, lengths[s.model], nbytes,
                                                          report_tokens=report_tokens, measured_as=rep.name)
                entries[s.name]["adapter_rank"] = key[2]
        if bar is not None:
            bar.close()
        out["measured"] = entries
    if "paper-testbed" in modes:
        entries = {}
        for s in specs:
            if s.device is None:
                raise InputError(f"expert {s.name!r} has no device; the paper-testbed mode needs one "
                                 f"(known: {', '.join(devices.known())})", param=f"{s.name}.device")
            dev = devices.with_power(devices.get(s.device, n_threads=n_threads), power_watts)
            used[dev.name] = dev
            entries[s.name] = expert_profile_emulated(s, dev, lengths[s.model], nbytes,
                                                      report_tokens=report_tokens)
        out["paper-testbed"] = entries
    return out, used


def _distinct(entries: Mapping[str, dict], key) -> dict[str, dict]:
    seen = {}
    for name, e in entries.items():
        seen.setdefault(key(name, e), (name, e))
    return {k: e for k, (_, e) in seen.items()}


def fig5_figure(doc: Mapping, answer_tokens: int | None = None):
    """Fig. 5: delay and energy per prompt vs prompt length, measured (points: median, bars: min-max,
    lines: the fit) and emulated paper testbed (dashed); every energy axis says whether it is estimated."""
    import matplotlib.pyplot as plt

    N = doc["answer_tokens"] if answer_tokens is None else answer_tokens
    modes = [m for m in PROFILE_MODES if m in doc["modes"]]
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7.5), squeeze=False)
    grid = np.geomspace(16, max(doc.get("prompt_lengths") or [512]), 60)
    for col, mode in enumerate(modes):
        entries = doc["modes"][mode]
        if mode == "measured":
            shown = _distinct(entries, lambda n, e: e.get("measured_as", n))
            label = lambda n, e: f"{e['base_model']}" + (f"+LoRA r{e['adapter_rank']}" if e.get("adapter_rank") else "")
        else:
            shown = _distinct(entries, lambda n, e: f"{e['model']['name']} @ {e['device']}")
            label = lambda n, e: n
        sources = set()
        for i, (name, e) in enumerate(shown.items()):
            color = f"C{i}"
            model = model_of(e)
            dev = devices.Device(**{**doc["devices"][e["device"]], "notes": ()}) if e["device"] in doc.get(
                "devices", {}) else None
            tau = 0.0 if dev is None or dev.link_rate is None else 4.0 * grid / dev.link_rate  # ~4 bytes/token
            T = tau + model.compute_time(grid, N)
            ls = "-" if mode == "measured" else "--"
            axes[0, col].plot(grid, T, ls, color=color, label=label(name, e))
            axes[1, col].plot(grid, model.compute_time(grid, N) * e["power_w"], ls, color=color, label=label(name, e))
            src = e["classes"]["all"]["energy_source"]
            sources.add(src)
            if mode == "measured":
                recs = e["measurements"]
                Ls = sorted({r["prompt_tokens"] for r in recs})
                per = {L: [r for r in recs if r["prompt_tokens"] == L] for L in Ls}
                t = {L: np.array([r["prefill_s"] + (N - 1) * r["decode_s"] for r in per[L]]) for L in Ls}
                j = {L: np.array([r["prefill_j"] + (N - 1) * r["decode_j"] for r in per[L]]) for L in Ls}
                for ax, v in ((axes[0, col], t), (axes[1, col], j)):
                    med = np.array([np.median(v[L]) for L in Ls])
                    err = np.array([[med[k] - v[L].min(), v[L].max() - med[k]] for k, L in enumerate(Ls)]).T
                    ax.errorbar(Ls, med, yerr=err, fmt="o", color=color, capsize=3)
        kind = ("estimated" if all(s.startswith("estimated:") for s in sources) else
                "measured" if all(s.startswith("measured:") for s in sources) else "measured/estimated")
        where = "this machine (measured delay)" if mode == "measured" else "paper testbed (emulated)"
        axes[0, col].set_title(f"{where}: delay of a {N}-token answer")
        axes[1, col].set_title(f"energy per prompt — {kind.upper()}", color="C3" if kind != "measured" else "k")
        axes[0, col].set_ylabel("delay T_k (s)")
        axes[1, col].set_ylabel(f"energy e_k (J, {kind})")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt length (tokens)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        axes[1, col].text(0.01, 0.01, "\n".join(sorted(sources)), transform=axes[1, col].transAxes, fontsize=6,
                          va="bottom")
    fig.suptitle("Fig. 5 — delay and energy vs prompt length per expert")
    fig.tight_layout()
    return fig


def fit_figure(doc: Mapping, mode: str = "measured"):
    """Measured vs fitted times (every repetition; prefill and per-token decode) with the ±20% band."""
    import matplotlib.pyplot as plt

    entries = _distinct(doc["modes"][mode], lambda n, e: e.get("measured_as", n))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    span = {0: [np.inf, 0.0], 1: [np.inf, 0.0]}
    for i, (name, e) in enumerate(entries.items()):
        model = model_of(e)
        recs = e["measurements"]
        L = np.array([r["prompt_tokens"] for r in recs], dtype=float)
        for a, kind, key in ((0, "prefill", "prefill_s"), (1, "decode", "decode_s")):
            y = np.array([r[key] for r in recs])
            p = model.predict(np.full(L.shape, kind), L)
            err = e["fit"]["heldout_median_rel_error"]  # None: too few prompt lengths to hold one out
            axes[a].scatter(p, y, s=14, color=f"C{i}", zorder=3, label=f"{e['base_model']} (held-out median error "
                            + ("n/a)" if err is None else f"{100 * err:.0f}%)"))
            span[a] = [min(span[a][0], p.min(), y.min()), max(span[a][1], p.max(), y.max())]
    for a, title in enumerate(("prompt step (time to first token)", "answer step (s per token)")):
        ax = axes[a]
        g = np.geomspace(span[a][0] / 1.5, span[a][1] * 1.5, 10)
        ax.plot(g, g, "k-", lw=0.8, zorder=2)
        ax.fill_between(g, g / 1.2, g * 1.2, color="0.85", label="±20%", zorder=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fitted eqs. (4)–(6) (s)")
        ax.set_ylabel("measured (s)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Delay model fit vs measurement ({mode})")
    fig.tight_layout()
    return fig
