"""Testbed tables (Tables II–IV): accuracy under a delay budget × energy budgets, with Alg. 3 inference.

For each delay budget T and energy budget E:

* **MoE2** — SMO (Alg. 2) picks ``S*`` minimising the gating's fused loss on the gating's training
  prompts under ``max delay <= T - t_gate`` and ``sum energy <= E``; on each test prompt the Top-k
  of ``S*`` by gating value are kept, their weights renormalised (28) and their distributions fused
  (29); the answer is the fused argmax.
* **SMO + M.V.** — the same ``S*``, answered by majority voting of its members.
* **Random + M.V.** — a random feasible subset (experts visited in a random order, each added while
  both budgets still hold, so the subset is maximal), majority voting; mean and spread over seeds.

A budget no expert fits gives NaN (printed as "—"). Budgets for a machine other than the paper's
testbed come from :func:`rescale_budgets`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core import gating, smo
from ..core.scores import align_rows
from ..errors import InputError
from .evaluation import majority_vote

PAPER_ENERGY_BUDGETS = (5.0, 10.0, 15.0, 20.0, 25.0, 35.0, 50.0)  # J per prompt, Tables II–IV
PAPER_DELAY_BUDGETS = {"1 s (Table II)": 1.0, "2 s (Table III)": 2.0, "relaxed (Table IV)": math.inf}
TABLE_METHODS = ("MoE2", "SMO + M.V.", "Random + M.V.")


@dataclass(frozen=True)
class Split:
    """Gating values ``gate[N, K]``, expert distributions ``probs[N, K, C]`` and answers ``answer[N]``."""

    gate: np.ndarray
    probs: np.ndarray
    answer: np.ndarray

    def __post_init__(self):
        n, k = np.shape(self.gate)
        if np.shape(self.probs)[:2] != (n, k) or np.shape(self.answer) != (n,):
            raise InputError(f"gate {np.shape(self.gate)}, probs {np.shape(self.probs)} and answer "
                             f"{np.shape(self.answer)} disagree in N or K", param="split")

    def loss(self, masks) -> np.ndarray:
        """The SMO objective: mean fused NLL of the correct answer for each subset mask (m, K)."""
        return gating.subset_loss(self.gate, self.probs, self.answer, masks)


def moe2_answers(split: Split, mask, top_k: int | None) -> np.ndarray:
    """Alg. 3 on each prompt: Top-k of ``mask`` by gating value, renormalised weights, fused argmax."""
    return gating.fused_answer(split.gate, split.probs, mask, top_k)


def random_feasible_subset(delay, energy, delay_budget, energy_budget, rng) -> np.ndarray:
    """A random maximal subset within both budgets (empty when no expert fits)."""
    delay, energy = np.asarray(delay, float), np.asarray(energy, float)
    mask = np.zeros(delay.size, dtype=bool)
    spent = 0.0
    for k in rng.permutation(delay.size):
        if delay[k] <= delay_budget and spent + energy[k] <= energy_budget:
            mask[k] = True
            spent += energy[k]
    return mask


@dataclass
class BudgetCell:
    """One (delay budget, energy budget) cell: the SMO subset and each method's accuracy."""

    delay_budget: float
    energy_budget: float
    subset: np.ndarray
    feasible: bool
    accuracy: dict
    random_std: float
    evaluations: int
    smo_seconds: float
    smo_loss: float
    exhaustive_loss: float  # nan when not checked (K > 16)


def budget_cell(train: Split, test: Split, delay, energy, delay_budget: float, energy_budget: float, *,
                top_k: int | None = 2, n_random: int = 20, seed: int = 0, eps: float = 0.0,
                t_gate: float = 0.0) -> BudgetCell:
    """Accuracy of the three methods on ``test`` for one pair of budgets (SMO's loss on ``train``)."""
    budget = max(delay_budget - t_gate, 0.0)
    r = smo.select_subset(train.loss, delay, energy, budget, energy_budget, eps=eps)
    acc = {m: math.nan for m in TABLE_METHODS}
    if r.feasible:
        acc["MoE2"] = float((moe2_answers(test, r.mask, top_k) == test.answer).mean())
        acc["SMO + M.V."] = float((majority_vote(test.probs, r.mask) == test.answer).mean())
    rng = np.random.default_rng(seed)
    rand = []
    for _ in range(n_random):
        mask = random_feasible_subset(delay, energy, budget, energy_budget, rng)
        if mask.any():
            rand.append(float((majority_vote(test.probs, mask) == test.answer).mean()))
    if rand:
        acc["Random + M.V."] = float(np.mean(rand))
    exhaustive = math.nan
    if np.size(delay) <= 16:  # the reference: SMO's gap where the finite gating breaks Theorem 2
        exhaustive = smo.exhaustive_subset(train.loss, delay, energy, budget, energy_budget).loss
    return BudgetCell(delay_budget, energy_budget, r.mask, r.feasible, acc,
                      float(np.std(rand)) if rand else math.nan, r.evaluations, r.elapsed_s, r.loss, exhaustive)


class _TableSplit(Split):
    """A Split whose loss is looked up in a precomputed table of all 2^K subsets (K <= 16)."""

    def loss(self, masks) -> np.ndarray:
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        return self._table[masks.astype(np.int64) @ (1 << np.arange(masks.shape[1]))]


def _with_table_loss(split: Split, K: int) -> Split:
    """The subset losses do not depend on the budgets: for small K compute all of them once per table."""
    if K > 16 or isinstance(split, _TableSplit):
        return split
    fast = _TableSplit(split.gate, split.probs, split.answer)
    table = np.full(1 << K, np.inf)
    table[1:] = split.loss(smo.int_to_masks(np.arange(1, 1 << K), K))
    object.__setattr__(fast, "_table", table)
    return fast


def testbed_table(train: Split, test: Split, delay, energy, delay_budget: float,
                  energy_budgets: Sequence[float], **options):
    """One paper table: rows are the methods, columns the energy budgets; also the cells themselves."""
    train = _with_table_loss(train, np.size(delay))
    cells = [budget_cell(train, test, delay, energy, delay_budget, e, **options) for e in energy_budgets]
    return _layout([c.energy_budget for c in cells], [c.accuracy for c in cells]), cells


def _layout(energy_budgets, accuracies):
    """Tables II-IV's layout: methods x energy budgets, accuracy in %."""
    import pandas as pd

    table = pd.DataFrame({f"{e:g}": [100 * a[m] for m in TABLE_METHODS] for e, a in zip(energy_budgets, accuracies)},
                         index=list(TABLE_METHODS))
    table.index.name = "method"
    return table


def table_from_records(records: Sequence[dict]):
    """A table back from its :func:`cell_records` (null: no energy budget, or accuracy NaN)."""
    return _layout([math.inf if r["energy_budget_j"] is None else float(r["energy_budget_j"]) for r in records],
                   [{m: math.nan if v is None else float(v) for m, v in r["accuracy"].items()} for r in records])


def write_tables(out_dir, results: dict) -> list:
    """Each table of ``results`` (``{"<mode>_delay-<label>": {"delay_budget_s", "cells"}}``, in order) as
    ``<name>.csv``, and all of them in ``tables.md``: the tables stage's files, from its records alone."""
    from pathlib import Path

    from ..infra import artifacts

    out_dir, paths, parts = Path(out_dir), [], []
    for name, result in results.items():
        table = table_from_records(result["cells"])
        paths.append(artifacts.write_text(out_dir / f"{name}.csv", table.to_csv(float_format="%.2f")))
        mode, label = name.rsplit("_delay-", 1)
        D = math.inf if result["delay_budget_s"] is None else result["delay_budget_s"]
        parts.append(markdown(table, f"{mode}, delay budget {label} ({D:.3g} s)"))
    paths.append(artifacts.write_text(out_dir / "tables.md", "\n".join(parts)))
    return paths


def answer_energy_scale(one_token_energy, answer_energy) -> float:
    """How much more energy an answer costs than one token: the ratio of the experts' mean energies.

    The paper's energy grid (5-50 J) fits one-token answers on the emulated testbed (2-8 J per expert);
    tables for longer answers multiply it by this factor, so each budget keeps its place among the
    experts' costs (the smallest fits one cheap expert, the largest most of them).
    """
    e1, eN = np.asarray(one_token_energy, float), np.asarray(answer_energy, float)
    if e1.shape != eN.shape or not e1.size or not (e1 > 0).all() or not np.isfinite(eN).all():
        raise InputError(f"energies must be positive and of the same experts, got {e1} and {eN}", param="energy")
    return float(eN.mean() / e1.mean())


def rescale_budgets(delay_budgets, energy_budgets, reference: tuple, target: tuple):
    """Budgets for another machine: scaled by the ratio of the experts' mean delay and mean energy.

    ``reference`` and ``target`` are ``(delay[K], energy[K])`` of the same experts on the paper's testbed
    (emulated) and on the target machine, so a budget keeps the same place among the experts' costs.
    """
    (d0, e0), (d1, e1) = reference, target
    fd = float(np.mean(d1) / np.mean(d0))
    fe = float(np.mean(e1) / np.mean(e0))
    return [b * fd for b in delay_budgets], [b * fe for b in energy_budgets]


def reselection_latency(loss, delay, energy, energy_budget: float, repetitions: int = 20) -> dict:
    """Milliseconds of one :func:`smo.select_subset` call when conditions change: the energy budget moves
    to 60–98% of ``energy_budget``, or one member of the subset chosen under it goes down (each in turn).

    Returns ``{"budget_change_ms" | "expert_down_ms": {"median", "max"}}`` (no delay budget).
    """
    first = smo.select_subset(loss, delay, energy, math.inf, energy_budget)
    members = np.flatnonzero(first.mask)
    lat = {"budget_change_ms": [], "expert_down_ms": []}
    for rep in range(repetitions):
        t = time.perf_counter()
        smo.select_subset(loss, delay, energy, math.inf, energy_budget * (0.6 + 0.02 * rep))
        lat["budget_change_ms"].append(1e3 * (time.perf_counter() - t))
        if members.size:
            down = np.ones(len(first.mask), bool)
            down[members[rep % members.size]] = False
            t = time.perf_counter()
            smo.select_subset(loss, delay, energy, math.inf, energy_budget, available=down)
            lat["expert_down_ms"].append(1e3 * (time.perf_counter() - t))
    return {k: {"median": float(np.median(v)), "max": float(np.max(v))} for k, v in lat.items() if v}


def pareto_front(cost, accuracy) -> np.ndarray:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    cost, accuracy = np.asarray(cost, float), np.asarray(accuracy, float)
    order = np.lexsort((-accuracy, cost))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return np.array(front, dtype=np.int64)


def all_subsets(split: Split, delay, energy, top_k: int | None = 2):
    """Every non-empty subset (K <= 16): its mask, delay, energy and MoE2 accuracy on ``split``."""
    K = np.shape(delay)[0]
    if K > 16:
        raise InputError(f"{K} experts: 2^K subsets are too many to list (at most 16)", param="delay")
    masks = smo.int_to_masks(np.arange(1, 1 << K), K)
    acc = np.array([(moe2_answers(split, m, top_k) == split.answer).mean() for m in masks])
    return masks, smo.subset_delay(masks, np.asarray(delay, float)), \
        smo.subset_energy(masks, np.asarray(energy, float)), acc


def markdown(table, title: str) -> str:
    """A table as GitHub Markdown, NaN as a dash."""
    cols = list(table.columns)
    lines = [f"**{title}**", "", "| method | " + " | ".join(f"{float(c):.3g} J" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, row in table.iterrows():
        lines.append(f"| {name} | " + " | ".join("—" if np.isnan(v) else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def load_splits(scores_path, gate_path) -> tuple[Split, Split, list[str]]:
    """The gating stage's train and test prompts: ``gate.npz`` (qid, gate[N, K], train[N]) joined to the scores by qid.

    Where the gating stage calibrated the experts (``temperature`` in gate.npz), the probabilities are
    tempered the same way.
    """
    from ..core.scores import Scores
    from ..infra import artifacts
    from .evaluation import temper

    scores = Scores.load(scores_path)
    g = artifacts.read_npz(gate_path)
    for key in ("qid", "gate", "train"):
        if key not in g:
            raise InputError(f"lacks {key!r}", path=gate_path, param=key)
    if g["gate"].shape != (g["qid"].size, scores.probs.shape[1]):
        raise InputError(f"gate has shape {g['gate'].shape}, expected ({g['qid'].size}, {scores.probs.shape[1]})",
                         path=gate_path, param="gate")
    rows = align_rows(g["qid"], scores.qid, path=gate_path)
    train = g["train"].astype(bool)
    probs = scores.probs if "temperature" not in g else temper(scores.probs, g["temperature"])  # as the gating saw them
    split = lambda sel: Split(g["gate"][sel], probs[rows[sel]], scores.answer[rows[sel]])  # noqa: E731
    return split(train), split(~train), [str(e) for e in scores.experts]


def delay_labels(delay_budgets) -> list[str]:
    """File-name-safe labels of delay budgets: ``1s``, ``2s``, ``relaxed``."""
    return ["relaxed" if d is None or math.isinf(d) else f"{d:g}s" for d in delay_budgets]


def heatmap_figure(results: dict):
    """One heatmap per table: methods × energy budgets, accuracy (%) in each cell."""
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.5 + 1.3 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        cells = results[name]["cells"]
        acc = 100 * np.array([[c["accuracy"][m] for c in cells] for m in TABLE_METHODS], dtype=float)  # None -> nan
        ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto")
        mid = np.nanmean(acc) if np.isfinite(acc).any() else 0.0
        ax.set_yticks(range(len(TABLE_METHODS)), TABLE_METHODS)
        ax.set_xticks(range(len(cells)), [f"{c['energy_budget_j']:.3g}" for c in cells])
        for (i, j), v in np.ndenumerate(acc):
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if np.isnan(v) or v < mid else "black", fontsize=8)
        d = results[name]["delay_budget_s"]
        ax.set_title(f"{name} (delay budget {'none' if d is None else f'{d:.3g} s'})", fontsize=9)
    axes[-1, 0].set_xlabel("energy budget per prompt (J)")
    fig.tight_layout()
    return fig


def pareto_figure(masks, delay, energy, accuracy, title: str):
    """Accuracy of every subset against its energy and its delay, with the Pareto fronts."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    size = masks.sum(1)
    for ax, cost, label in ((axes[0], energy, "energy per prompt (J)"), (axes[1], delay, "delay per prompt (s)")):
        sc = ax.scatter(cost, 100 * accuracy, c=size, cmap="viridis", s=12, alpha=0.7)
        front = pareto_front(cost, accuracy)
        ax.step(cost[front], 100 * accuracy[front], where="post", color="crimson", label="Pareto front")
        ax.set_xlabel(label)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("MoE2 accuracy (%)")
    fig.colorbar(sc, ax=axes, label="experts in the subset")
    fig.suptitle(title, fontsize=10)
    return fig


def _json_number(x):
    """A float for JSON: None for NaN (no expert fits) and infinity (no budget)."""
    return float(x) if np.isfinite(x) else None


def cell_records(cells: Sequence[BudgetCell], experts: Sequence[str]) -> list[dict]:
    """The cells of one table as JSON records (the subset by expert name; NaN and inf as null)."""
    return [{"energy_budget_j": _json_number(c.energy_budget), "subset": [experts[i] for i in np.flatnonzero(c.subset)],
             "accuracy": {m: _json_number(v) for m, v in c.accuracy.items()}, "random_std": _json_number(c.random_std),
             "smo_evaluations": c.evaluations, "smo_seconds": c.smo_seconds, "smo_loss": _json_number(c.smo_loss),
             "exhaustive_loss": _json_number(c.exhaustive_loss)} for c in cells]
