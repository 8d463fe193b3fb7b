"""Device profiling: each expert's measured delay and energy under llama.cpp, the profiles stage, profiles.json.

The cost model these measurements are fitted to (eqs. 4-12) is :mod:`moe2lib.core.costmodel`. Here: the GGUF's
costs as llama.cpp reads them (:func:`gguf_cost`), timing (and metering) the prompt step and the answer
steps (:func:`measure`), one profile entry per expert — measured on this machine (``measured``) or emulated
on the paper's testbed (``paper-testbed``) — the stage that builds them (:func:`build_profiles`), the
profiles file, and the Fig. 5 and fit figures.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core import costmodel, devices
from ..errors import InputError
from ..infra import artifacts
from . import registry
from .experts import adds_bos

PROFILE_MODES = ("measured", "paper-testbed")


# ----------------------------------------------------------------------------- the GGUF's costs

def llama_cost(llm, name: str, source: str) -> costmodel.ModelCost:
    """A loaded llama-cpp-python model's parameter count, tensor bytes, layers and attention width."""
    import llama_cpp

    md = llm.metadata
    arch = md["general.architecture"]
    heads = int(md[f"{arch}.attention.head_count"])
    width = int(md[f"{arch}.embedding_length"])
    head_dim = int(md.get(f"{arch}.attention.key_length", width // heads))
    mp = llm._model.model
    return costmodel.ModelCost(name, float(llama_cpp.llama_model_n_params(mp)),
                               float(llama_cpp.llama_model_size(mp)), int(md[f"{arch}.block_count"]),
                               heads * head_dim, source)


def gguf_cost(path, name: str | None = None) -> costmodel.ModelCost:
    """:func:`llama_cost` of a GGUF file (memory-mapped by llama.cpp: fast, nothing is computed)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, verbose=False)
    try:
        return llama_cost(llm, name or Path(path).name, f"gguf:{Path(path).name}")
    finally:
        llm.close()


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
    """llama-cpp-python as :class:`moe2lib.models.experts.LlamaCppExpert` loads it, plus GPU offload; (llm, bos)."""
    import llama_cpp

    path = registry.locate(model, "llm") if weights == "native" else registry.requantized(model, weights)
    if adapter is not None and not Path(adapter).is_file():
        raise InputError("LoRA adapter file not found", path=adapter)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, lora_path=adapter, n_gpu_layers=n_gpu_layers, verbose=False)
    bos = llm.token_bos() if adds_bos(llm.metadata) else None
    return llm, bos, path


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
            weights: str = "native", n_gpu_layers: int = 0, seed: int = 0,
            progress=None) -> tuple[list, costmodel.ModelCost]:
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
    cost = llama_cost(llm, registry.display_name(model) if weights == "native" else f"{model}:{weights}",
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

def expert_profile_measured(spec, records, cost: costmodel.ModelCost, device: devices.Device, prompt_tokens,
                            prompt_bytes, *, report_tokens, measured_as: str) -> dict:
    """One expert's measured-mode entry: fit, held-out error, power, per-class costs and the raw records."""
    model = costmodel.fit_records(records, cost, device)
    held = costmodel.heldout_errors(records, cost, device)
    pre = np.array([r["prefill_s"] for r in records])
    dec = np.array([r["decode_s"] for r in records])
    kinds = ["prefill"] * len(records) + ["decode"] * len(records)
    Ls = [r["prompt_tokens"] for r in records] * 2
    ratio = np.concatenate([pre, dec]) / model.predict(kinds, Ls)
    jitter = float(max(1.0, np.quantile(ratio, costmodel.QUANTILE)))
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
        "classes": costmodel.class_costs(model, device, prompt_tokens, prompt_bytes, power_w=power,
                                         energy_source=source, report_tokens=report_tokens, jitter=jitter),
        "measurements": records,
    }


def expert_profile_emulated(spec, device: devices.Device, prompt_tokens, prompt_bytes, *, report_tokens,
                            power_w: float | None = None) -> dict:
    """The paper-testbed entry: the paper's model (Qwen2.5 7B/3B Q4_K_M) on the catalogue device, emulated."""
    cost = costmodel.paper_model(spec.model)
    model = costmodel.RooflineModel.from_device(cost, device)
    power = device.busy_w if power_w is None else power_w
    how = f"estimated:busy_time*{power:g}W({device.power_how if power_w is None else 'power_w argument'})"
    return {
        "device": device.name, "base_model": spec.model, "adapter": artifacts.portable_path(spec.adapter),
        "source": f"emulated:{device.name}:{cost.name}", "model": cost.to_dict(),
        "fit": {**model.params(), "eta_flops": device.eta_flops, "eta_bandwidth": device.eta_bandwidth,
                "note": "not fitted: catalogue peak x efficiency and overhead (devices.py)"},
        "power_w": power, "jitter_p95": 1.0,
        "classes": costmodel.class_costs(model, device, prompt_tokens, prompt_bytes, power_w=power,
                                         energy_source=how, report_tokens=report_tokens),
    }


def write_profiles(path, modes: Mapping[str, Mapping[str, dict]], *, answer_tokens: int, report_tokens,
                   devices_used: Mapping[str, devices.Device], **extra) -> Path:
    doc = {
        "version": 1, "answer_tokens": int(answer_tokens), "report_tokens": [int(n) for n in report_tokens],
        "quantile": costmodel.QUANTILE,
        "app_classes": {k: [lo, None if math.isinf(hi) else hi]
                        for k, (lo, hi) in costmodel.APP_CLASSES.items()},
        "app_class_basis": "MMLU zero-shot prompt length in tokens under each expert's base-model tokenizer; "
                           "'all' = every prompt",
        "delay_model": "T = D/r + prefill(L) + (N-1) t(L); step = max(C/F, M/B) + c (eqs. 4-6)",
        "devices": {k: d.to_dict() for k, d in devices_used.items()},
        "modes": {m: dict(v) for m, v in modes.items()}, **extra,
    }
    return artifacts.write_json(path, doc)


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
    if isinstance(experts, (str, Path)):
        from .experts import read_registry
        experts = read_registry(experts)
    names = costmodel.expert_names(experts)
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


# ----------------------------------------------------------------------------- the stage

def prompt_token_counts(model: str, prompts: Sequence[str]) -> np.ndarray:
    """Token count of each prompt under a base model's tokenizer (BOS included where the model adds one)."""
    import llama_cpp

    path = registry.locate(model, "llm")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        bos = int(adds_bos(llm.metadata))
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
        raise InputError(f"unknown profile mode {unknown[0]!r}; known: {', '.join(PROFILE_MODES)}", param="modes")
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
            model = costmodel.model_of(e)
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
        model = costmodel.model_of(e)
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
