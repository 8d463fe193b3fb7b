"""Fig. 3 baselines, bootstrap intervals, relative improvements and the checks of Theorems 1 and 2.

Everything works on a test split given as ``probs[N, K, C]`` (the fine-tuned experts' letter
distributions), ``answer[N]`` and the gating values ``gate[N, K]``. Per-prompt correctness vectors
(1.0 right, 0.0 wrong; fractional for the average expert) are kept so that every accuracy gets a
paired, seeded bootstrap interval from the same resampled prompts.

Methods (keys of :data:`METHODS`):

* ``single_agent`` — a base model, un-tuned (the better of the base models on the *training* split);
* ``average_expert`` — A.E.A., the mean accuracy of the fine-tuned experts;
* ``majority_voting`` — M.V.: every expert votes its argmax letter, equal weights; ties go to the
  letter with the larger summed probability among the voters, then to the earlier letter;
* ``best_expert`` — the expert with the best accuracy on the *training* split, reported on test;
* ``router_top1`` — the expert with the largest gating value answers alone;
* ``moe2`` — eq. (3) over all K experts, fused argmax;
* ``moe2_topk`` — Alg. 3: the Top-k experts by gating value, renormalised (28), fused (29);
* ``oracle`` — right whenever some expert is right (an upper bound for any selection of one expert).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ..core import gating, smo
from ..core.scores import align_rows, correct_matrix  # noqa: F401 - part of this module's API
from ..core.stats import bootstrap_means, percentile_interval, relative_improvement, stratified_sample
from ..errors import InputError, check_int

METHODS = ("single_agent", "generalist", "average_expert", "majority_voting", "best_expert", "router_top1", "moe2",
           "moe2_topk", "oracle")
LABELS = {"single_agent": "Single Agent", "generalist": "Generalist LoRA", "average_expert": "A.E.A.",
          "majority_voting": "Majority Voting",
          "best_expert": "Best expert", "router_top1": "Top-1 router", "moe2": "MoE2", "moe2_topk": "MoE2 Top-k",
          "oracle": "Oracle"}
# Fig. 3 of the paper: relative accuracy gain of MoE2 over each baseline, (a - b) / b
PAPER_IMPROVEMENT = {"single_agent": 0.144, "majority_voting": 0.073, "average_expert": 0.164}
# Paired differences a - b reported with bootstrap intervals: MoE2 against the paper's baselines, and what
# recognising the task buys (the top-1 router over a single model) apart from what fusion adds on top of it.
DIFFERENCES = (("moe2", "single_agent"), ("moe2", "generalist"), ("moe2", "majority_voting"), ("moe2", "average_expert"),
               ("moe2", "best_expert"), ("moe2", "router_top1"), ("moe2_topk", "router_top1"),
               ("moe2_topk", "single_agent"), ("router_top1", "single_agent"), ("router_top1", "best_expert"))


# --------------------------------------------------------------------------- baselines

def align_scores(qid, scores, *, answer=None, path=None):
    """``scores`` (a :class:`~moe2lib.core.scores.Scores`) reordered to ``qid``; with ``answer``, the answers must agree."""
    aligned = scores.subset(align_rows(qid, scores.qid, path=path))
    if answer is not None:
        bad = np.flatnonzero(aligned.answer != np.asarray(answer))
        if bad.size:
            raise InputError(f"{bad.size} answers disagree with the questions (first: {aligned.qid[bad[0]]!r})",
                             path=path, param="answer")
    return aligned


def majority_vote(probs, mask=None) -> np.ndarray:
    """Most voted letter among the experts in ``mask`` (default all); ties by summed probability, then letter order."""
    probs = np.asarray(probs, dtype=np.float64)
    n, k, c = probs.shape
    mask = np.ones(k, bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (k,) or not mask.any():
        raise InputError(f"mask must be a non-empty (K={k},) subset", param="mask")
    sub = probs[:, mask]
    votes = np.zeros((n, c))
    np.add.at(votes, (np.arange(n)[:, None], sub.argmax(-1)), 1.0)
    # summed probability < number of voters + 1, so it can only break ties between equal vote counts
    return (votes + sub.sum(1) / (mask.sum() + 1)).argmax(-1)


def best_expert(probs, answer) -> int:
    """Index of the most accurate expert (ties: the lower index); call it on the training split."""
    return int(np.argmax(correct_matrix(probs, answer).mean(0)))


def correctness(probs, answer, gate, *, best: int, top_k: int, base_probs=None,
                base_names: Sequence[str] | None = None,
                best_base: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-prompt correctness of every method on one split → (methods {key: (N,)}, base models {name: (N,)}).

    ``base_probs`` [N, B, C] are the un-tuned base models on the same prompts, same order (None: no
    single-agent baseline); ``single_agent`` is base model ``best_base``, chosen like ``best`` on the
    training split (:func:`best_expert` of the base models' training scores).
    """
    probs = np.asarray(probs, dtype=np.float64)
    answer = np.asarray(answer)
    gate = np.asarray(gate, dtype=np.float64)
    n, k, _ = probs.shape
    if gate.shape != (n, k) or answer.shape != (n,):
        raise InputError(f"gate {gate.shape} and answer {answer.shape} must match probs {probs.shape}", param="gate")
    if not 0 <= best < k:
        raise InputError(f"must index one of the {k} experts, got {best}", param="best")
    right = correct_matrix(probs, answer)
    out = {
        "average_expert": right.mean(1),
        "majority_voting": (majority_vote(probs) == answer).astype(float),
        "best_expert": right[:, best],
        "router_top1": right[np.arange(n), gate.argmax(1)],
        "moe2": (gating.fused_answer(gate, probs) == answer).astype(float),
        "moe2_topk": (gating.fused_answer(gate, probs, top_k=top_k) == answer).astype(float),
        "oracle": right.max(1),
    }
    singles = {}
    if base_probs is not None:
        base_probs = np.asarray(base_probs)
        if base_probs.ndim != 3 or base_probs.shape[0] != n or base_probs.shape[2] != probs.shape[2]:
            raise InputError(f"base_probs {base_probs.shape} must be (N={n}, B, C={probs.shape[2]})",
                             param="base_probs")
        names = list(base_names) if base_names is not None else [f"base{i}" for i in range(base_probs.shape[1])]
        base_right = correct_matrix(base_probs, answer)
        singles = {str(nm): base_right[:, i] for i, nm in enumerate(names)}
        if not 0 <= best_base < base_probs.shape[1]:
            raise InputError(f"must index one of the {base_probs.shape[1]} base models, got {best_base}",
                             param="best_base")
        out["single_agent"] = base_right[:, best_base]
    return {m: out[m] for m in METHODS if m in out}, singles


def fig3_metrics(methods: Mapping[str, np.ndarray], singles: Mapping[str, np.ndarray] | None = None, *,
                 n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracies, bootstrap intervals and MoE2's relative improvements (paired bootstrap) → a JSON-able dict."""
    singles = dict(singles or {})
    keys = list(methods) + [f"base:{k}" for k in singles]
    values = np.stack([*methods.values(), *singles.values()])
    boot = bootstrap_means(values, n_bootstrap, seed)
    ci = percentile_interval(boot, level)
    acc = values.mean(1)
    row = {k: i for i, k in enumerate(keys)}
    improvement = {}
    for base in ("single_agent", "generalist", "majority_voting", "average_expert", "best_expert", "router_top1"):
        if base in row and "moe2" in row and acc[row[base]] > 0:
            rel = relative_improvement(boot[row["moe2"]], boot[row[base]])
            rel = rel[np.isfinite(rel)]  # a resample where the baseline is never right has no ratio
            improvement[base] = {
                "relative": float(relative_improvement(acc[row["moe2"]], acc[row[base]])),
                "ci95": [float(x) for x in percentile_interval(rel, level)] if rel.size else [math.nan, math.nan],
                "paper": PAPER_IMPROVEMENT.get(base)}
    differences = {}
    for a, b in DIFFERENCES:
        if a in row and b in row:
            d = boot[row[a]] - boot[row[b]]
            lo, hi = (float(x) for x in percentile_interval(d, level))
            differences[f"{a}-{b}"] = {"difference": float(acc[row[a]] - acc[row[b]]), "ci95": [lo, hi],
                                       "p_le_0": float((d <= 0).mean())}
    return {
        "accuracy": {k: float(acc[row[k]]) for k in methods},
        "ci95": {k: [float(x) for x in ci[row[k]]] for k in methods},
        "single_agents": {k: {"accuracy": float(acc[row[f"base:{k}"]]),
                              "ci95": [float(x) for x in ci[row[f"base:{k}"]]]} for k in singles},
        "improvement": improvement,
        "differences": differences,
    }


# --------------------------------------------------------------------------- Theorem 1

def random_subsets(k: int, n: int, seed: int = 0, *, min_size: int = 2) -> np.ndarray:
    """Up to ``n`` distinct proper subsets of K experts (sizes min_size..K-1; singletons when K=2) → (n, K) bool."""
    lo = min(min_size, k - 1) if k > 1 else 1
    pool = [m for size in range(lo, max(k - 1, lo) + 1) for m in itertools.combinations(range(k), size)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    out = np.zeros((len(chosen), k), bool)
    for r, i in enumerate(sorted(chosen)):
        out[r, list(pool[i])] = True
    return out


def theorem1_check(make_network: Callable[[], "gating.GatingNetwork"], train, test, gate_train, gate_test,
                   subsets) -> dict:
    """Theorem 1: retrain the gating on subset S alone vs renormalise the full-set gating (eq. 2).

    ``train``/``test`` are ``(X, probs, answer)``; ``gate_*`` the full-set network's gating values.
    For each mask S a fresh ``make_network()`` is fitted on ``probs[:, S]``; its fused loss and
    accuracy are compared with the renormalised full-set gating's on both splits. The theorem predicts
    ``gap = loss_retrained - loss_renormalised >= 0`` on train (up to the optimiser) and ≈ 0 on test.
    """
    Xtr, Ptr, ytr = train
    Xte, Pte, yte = test
    rows = []
    for mask in np.asarray(subsets, dtype=bool):
        sel = np.flatnonzero(mask)
        if len(sel) == 1:  # one expert: any gating gives it weight 1
            g_tr, g_te = np.ones((len(ytr), 1)), np.ones((len(yte), 1))
        else:
            net = make_network().fit(Xtr, Ptr[:, sel], ytr)
            g_tr, g_te = net.predict_proba(Xtr), net.predict_proba(Xte)
        full = np.ones(len(sel), bool)
        row = {"subset": sel.tolist(), "size": int(len(sel))}
        for split, g_full, g_sub, P, y in (("train", gate_train, g_tr, Ptr, ytr), ("test", gate_test, g_te, Pte, yte)):
            row[f"{split}_loss_renormalised"] = float(gating.subset_loss(g_full, P, y, mask))
            row[f"{split}_loss_retrained"] = float(gating.subset_loss(g_sub, P[:, sel], y, full))
            row[f"{split}_acc_renormalised"] = float(gating.subset_accuracy(g_full, P, y, mask))
            row[f"{split}_acc_retrained"] = float(gating.subset_accuracy(g_sub, P[:, sel], y, full))
            row[f"{split}_gap"] = row[f"{split}_loss_retrained"] - row[f"{split}_loss_renormalised"]
        rows.append(row)
    summary = {}
    for split in ("train", "test"):
        gaps = np.array([r[f"{split}_gap"] for r in rows])
        summary[split] = {"mean_gap": float(gaps.mean()) if len(gaps) else None,
                          "max_abs_gap": float(np.abs(gaps).max()) if len(gaps) else None,
                          "share_renormalised_not_worse": float((gaps >= -1e-9).mean()) if len(gaps) else None}
    return {"subsets": rows, "summary": summary}


# --------------------------------------------------------------------------- Theorem 2

def all_masks(k: int) -> np.ndarray:
    """Every subset of K experts, row i = the bits of i → (2^K, K) bool."""
    return smo.int_to_masks(np.arange(2 ** k), k)


def theorem2_check(gate, probs, answer, *, n_chains: int = 20, seed: int = 0, tol: float = 1e-9,
                   max_exhaustive_k: int = 10) -> dict:
    """Theorem 2 on data: does the empirical loss fall (weakly) along S ⊆ S'?

    With K <= ``max_exhaustive_k`` every nested pair of non-empty subsets is checked (``pairs``), and the
    pairs that add one expert (``steps``); always, ``n_chains`` random chains ∅ ⊂ S_1 ⊂ … ⊂ S_K (one
    expert added at a time, seeded order) give loss and accuracy curves. A violation is a rise of the
    loss by more than ``tol``; reported: its share, the largest and the mean rise.
    """
    gate = np.asarray(gate, dtype=np.float64)
    k = gate.shape[1]

    def stats(rise):
        bad = rise > tol
        return {"n": int(rise.size), "share_rising": float(bad.mean()) if rise.size else None,
                "max_rise": float(rise.max()) if rise.size else None,
                "mean_rise_when_rising": float(rise[bad].mean()) if bad.any() else 0.0}

    out = {"k": k, "tol": tol}
    if k <= max_exhaustive_k:
        masks = all_masks(k)
        loss = gating.subset_loss(gate, probs, answer, masks)
        acc = gating.subset_accuracy(gate, probs, answer, masks)
        ids = np.arange(2 ** k)
        sub, sup = np.nonzero(((ids[:, None] & ids[None, :]) == ids[:, None]) & (ids[:, None] != ids[None, :]))
        keep = sub > 0
        sub, sup = sub[keep], sup[keep]
        rise = loss[sup] - loss[sub]
        out["pairs"] = stats(rise)
        out["pairs"]["share_accuracy_falling"] = (float((acc[sup] < acc[sub] - 1e-12).mean()) if sub.size
                                                  else float("nan"))  # K = 1: no nested pairs
        step = np.array([bin(int(a ^ b)).count("1") == 1 for a, b in zip(sub, sup)], dtype=bool)
        out["steps"] = stats(rise[step])
        best = int(np.argmin(np.where(ids > 0, loss, np.inf)))
        out["best_subset"] = {"experts": np.flatnonzero(masks[best]).tolist(), "loss": float(loss[best]),
                              "full_set_loss": float(loss[-1])}
    rng = np.random.default_rng(seed)
    chains_loss, chains_acc, orders = [], [], []
    for _ in range(n_chains):
        order = rng.permutation(k)
        masks = np.zeros((k, k), bool)
        for i in range(k):
            masks[i, order[: i + 1]] = True
        chains_loss.append(gating.subset_loss(gate, probs, answer, masks))
        chains_acc.append(gating.subset_accuracy(gate, probs, answer, masks))
        orders.append(order.tolist())
    chains_loss = np.array(chains_loss).reshape(n_chains, k)
    out["chains"] = {"orders": orders, "loss": chains_loss.tolist(),
                     "accuracy": np.array(chains_acc).reshape(n_chains, k).tolist(),
                     **stats(np.diff(chains_loss, axis=1).ravel())}
    return out


# --------------------------------------------------------------------------- figures

def fig3_figure(metrics: Mapping, title: str = "MMLU accuracy (test split), 95% bootstrap intervals"):
    """Bars with bootstrap intervals in the order of the paper's Fig. 3 (+ our extra baselines), one per base model."""
    import matplotlib.pyplot as plt

    names, acc, ci, colors = [], [], [], []
    for base, v in metrics.get("single_agents", {}).items():
        names.append(f"S.A.\n{base}")
        acc.append(v["accuracy"])
        ci.append(v["ci95"])
        colors.append("#9e9e9e")
    for m in METHODS:
        if m == "single_agent" or m not in metrics["accuracy"]:
            continue
        names.append(LABELS[m].replace(" ", "\n", 1))
        acc.append(metrics["accuracy"][m])
        ci.append(metrics["ci95"][m])
        colors.append("#d62728" if m.startswith("moe2") else "#bcbd22" if m == "oracle" else
                      "#8c564b" if m == "generalist" else "#1f77b4")
    acc, ci = np.array(acc), np.array(ci)
    diffs = metrics.get("differences") or {}
    if diffs:
        fig, (ax, axd) = plt.subplots(1, 2, figsize=(1.0 * len(names) + 8, 3.8),
                                      gridspec_kw={"width_ratios": [len(names), 6]})
        _differences_axes(axd, diffs)
    else:
        fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.8))
    x = np.arange(len(names))
    ax.bar(x, acc, color=colors, yerr=np.abs(ci.T - acc), capsize=3)
    for xi, a, hi in zip(x, acc, ci[:, 1]):
        ax.text(xi, max(a, hi) + 0.01, f"{100 * a:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, min(1.08, max(0.3, float(ci.max()) + 0.08)))
    n_test = metrics.get("n_test")
    ax.set_title(title + (f" (n={n_test})" if n_test else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _differences_axes(ax, diffs: Mapping) -> None:
    """Paired differences a − b (points) with their 95% bootstrap intervals; the zero line marks no gain."""
    keys = list(diffs)[::-1]
    d = np.array([100 * diffs[k]["difference"] for k in keys])
    ci = np.array([[100 * x for x in diffs[k]["ci95"]] for k in keys])
    y = np.arange(len(keys))
    colors = ["#2ca02c" if lo > 0 else "#d62728" if hi < 0 else "#7f7f7f" for lo, hi in ci]
    ax.barh(y, d, color=colors, xerr=np.abs(ci.T - d), capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    label = lambda m: LABELS.get(m, m)  # noqa: E731
    ax.set_yticks(y, [" − ".join(label(m) for m in k.split("-")) for k in keys], fontsize=7)
    ax.set_xlabel("accuracy difference (points), paired bootstrap 95% CI")
    ax.set_title("green: interval above 0", fontsize=8)


def training_figure(history: Sequence[Mapping], best_epoch: int | None = None):
    """Train/validation fused NLL per epoch and the learning rate (ReduceLROnPlateau)."""
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(ep, [h["val_loss"] for h in history], label="validation")
    if best_epoch:
        ax.axvline(best_epoch, color="k", ls=":", label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fused NLL of the correct letter")
    ax.legend(fontsize=8)
    ax2.semilogy(ep, [h["lr"] for h in history])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    return fig


def theorems_figure(theorem1: Mapping, theorem2: Mapping):
    """Left: Theorem 1, retrained vs renormalised test loss per subset. Right: Theorem 2, loss along random chains."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = theorem1.get("subsets", [])
    if rows:
        for split, marker in (("train", "o"), ("test", "s")):
            a = [r[f"{split}_loss_renormalised"] for r in rows]
            b = [r[f"{split}_loss_retrained"] for r in rows]
            ax.scatter(a, b, marker=marker, label=split, alpha=0.8)
        every = [r[f"{s}_loss_{w}"] for r in rows for s in ("train", "test") for w in ("renormalised", "retrained")]
        lo, hi = min(every), max(every)
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.legend(fontsize=8)
    ax.set_xlabel("loss, full-set gating renormalised to S (eq. 2)")
    ax.set_ylabel("loss, gating retrained on S")
    ax.set_title("Theorem 1: optimality for subsets", fontsize=9)
    loss = np.array(theorem2["chains"]["loss"])
    sizes = np.arange(1, loss.shape[1] + 1)
    for row in loss:
        ax2.plot(sizes, row, color="#1f77b4", alpha=0.35, marker=".")
    where = "nested pairs" if "pairs" in theorem2 else "chain steps"
    share = theorem2.get("pairs", theorem2["chains"])["share_rising"]
    ax2.set_xlabel("subset size along a random nested chain")
    ax2.set_ylabel("fused NLL")
    ax2.set_xticks(sizes)
    said = f"loss rises on {100 * share:.1f}% of {where}" if share is not None else f"no {where} with K=1"
    ax2.set_title(f"Theorem 2: monotonic improvement ({said})", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- one Fig. 3 experiment

def temper(probs, temperature) -> np.ndarray:
    """``probs`` [N, K, C] sharpened (T < 1) or flattened (T > 1) per expert: p^(1/T_k), renormalised.

    The same as dividing each expert's logits by T_k; padded choices (probability 0) stay 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), probs.shape[1:2])
    with np.errstate(divide="ignore"):
        z = np.log(probs) / t[None, :, None]
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def fit_temperatures(probs, answer) -> np.ndarray:
    """Per expert, the temperature minimising the NLL of the correct choice (:func:`moe2lib.core.choice.fit_temperature`) → (K,).

    Choice-likelihood scores normalised per character are on a small scale (differences of ~0.1 nat):
    their softmax is nearly flat and fusion (eq. 3) would be decided by the few sharp experts. Fit this
    on the gating-training split only; padded choices (probability 0) are left out.
    """
    from ..core.choice import fit_temperature

    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    return np.array([fit_temperature(logp[:, k], answer, mask=probs[:, k] > 0) for k in range(probs.shape[1])])


def fig3_experiment(X, experts, base, train, test, make_network: Callable[[], "gating.GatingNetwork"], *,
                    top_k: int, n_bootstrap: int = 1000, seed: int = 0, calibrate: bool = True,
                    generalist=None) -> dict:
    """Fig. 3 on one split: calibrate and train the gating on ``train`` rows, score every method on ``test``.

    ``experts`` and ``base`` are :class:`~moe2lib.core.scores.Scores` aligned row by row with ``X``. Temperatures
    (``calibrate``), the best expert and the single agent's base model are all chosen on ``train``.
    ``generalist`` (optional Scores, same rows): one LoRA per base model trained on all the experts' data;
    the ``generalist`` method is the one of them that is best on ``train``, calibrated like the rest.
    Returns the metrics (Fig. 3 accuracies, intervals, relative gains, paired differences, per task), the
    fitted network, the gating values of every row, the calibrated probabilities and each method's
    per-question correctness on ``test`` (``correct``).
    """
    train, test = np.asarray(train), np.asarray(test)
    t_exp = fit_temperatures(experts.probs[train], experts.answer[train]) if calibrate else np.ones(len(experts.experts))
    t_base = fit_temperatures(base.probs[train], base.answer[train]) if calibrate else np.ones(len(base.experts))
    P, PB = temper(experts.probs, t_exp), temper(base.probs, t_base)
    y = experts.answer
    net = make_network().fit(X[train], P[train], y[train], x_qid=experts.qid[train], qid=experts.qid[train])
    G = net.predict_proba(X)
    best = best_expert(P[train], y[train])
    best_base = best_expert(PB[train], y[train])
    methods, singles = correctness(P[test], y[test], G[test], best=best, top_k=top_k, base_probs=PB[test],
                                   base_names=[str(b) for b in base.experts], best_base=best_base)
    about_generalist = {}
    if generalist is not None:
        t_gen = (fit_temperatures(generalist.probs[train], generalist.answer[train]) if calibrate
                 else np.ones(len(generalist.experts)))
        PG = temper(generalist.probs, t_gen)
        best_gen = best_expert(PG[train], y[train])
        methods["generalist"] = correct_matrix(PG[test], y[test])[:, best_gen]
        methods = {m: methods[m] for m in METHODS if m in methods}
        about_generalist = {"generalist_model": str(generalist.experts[best_gen]),
                            "generalists": {str(e): float(a) for e, a in
                                            zip(generalist.experts, correct_matrix(PG[test], y[test]).mean(0))}}
    fig3 = fig3_metrics(methods, singles, n_bootstrap=n_bootstrap, seed=seed)
    tasks = np.asarray(experts.task)[test]
    per_task = {str(t): {"n": int((tasks == t).sum()),
                         **{m: float(v[tasks == t].mean()) for m, v in methods.items()}}
                for t in np.unique(tasks)}
    metrics = {**fig3, "n_test": int(len(test)), "n_train": int(len(train)), "per_task": per_task,
               "experts": {str(e): float(a) for e, a in zip(experts.experts, correct_matrix(P[test], y[test]).mean(0))},
               "best_expert": str(experts.experts[best]), "single_agent_model": str(base.experts[best_base]),
               "top_k": int(top_k), "temperatures": {"experts": t_exp.tolist(), "base": t_base.tolist()},
               **about_generalist}
    return {"metrics": metrics, "network": net, "gate": G, "probs": P, "base_probs": PB, "correct": methods}


NETWORK_KEYS = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "grad_accum", "max_grad_norm",
                "max_epochs", "patience", "val_fraction", "lr_factor", "lr_patience")


def network_factory(params: Mapping, seed: int) -> Callable[[], "gating.GatingNetwork"]:
    """A maker of gating networks with a gating stage's parameters (those of NETWORK_KEYS it has), one thread."""
    net_params = {k: (tuple(params[k]) if k == "hidden" else params[k]) for k in NETWORK_KEYS if k in params}
    return lambda: gating.GatingNetwork(**net_params, seed=seed, n_threads=1)


def resplit(artifacts_dir, seed: int, *, n_bootstrap: int | None = None) -> dict:
    """Fig. 3 again on a new seeded gating-training/test split of a finished run, from its artifacts alone.

    Reads ``scoring/scores.npz``, ``base_models/scores.npz`` and ``gating/embeddings.npz`` (no model runs),
    re-draws the test rows with ``seed`` (as many as the run had, in proportion per task), retrains the
    gating with the run's parameters (``gating/meta.json``) and returns the metrics dict of
    :func:`fig3_experiment` with ``seed`` added.
    """
    from pathlib import Path

    from ..core.scores import Scores
    from ..infra import artifacts

    art = Path(artifacts_dir)
    paths = {n: art / rel for n, rel in (("experts", "scoring/scores.npz"), ("base", "base_models/scores.npz"),
                                         ("embeddings", "gating/embeddings.npz"), ("split", "gating/split.npz"))}
    for p in paths.values():
        if not p.exists():
            raise InputError("not found: run the pipeline (choice scoring) first, or pass the run's folder",
                             path=p)
    meta = artifacts.read_meta(art / "gating") or {}
    params = meta.get("params", {})
    emb = artifacts.read_npz(paths["embeddings"])
    qid = emb["qid"].astype(str)
    E = align_scores(qid, Scores.load(paths["experts"]), path=paths["experts"])
    B = align_scores(qid, Scores.load(paths["base"]), answer=E.answer, path=paths["base"])
    gen_path = art / "scoring" / "generalists.npz"
    G = align_scores(qid, Scores.load(gen_path), answer=E.answer, path=gen_path) if gen_path.exists() else None
    split = artifacts.read_npz(paths["split"])
    n_test = check_int(int(np.asarray(split["test"]).sum()), "n_test", high=E.n - 1)  # a train row is left
    test = stratified_sample(E.task, n_test, seed, remainder="random")
    train = np.setdiff1d(np.arange(E.n), test)
    run = fig3_experiment(emb["X"].astype(np.float32), E, B, train, test, network_factory(params, seed),
                          top_k=int(params.get("top_k", 2)),
                          n_bootstrap=int(n_bootstrap or params.get("n_bootstrap", 1000)), seed=seed,
                          calibrate=bool(params.get("calibrate", True)), generalist=G)
    return {**run["metrics"], "seed": seed}
