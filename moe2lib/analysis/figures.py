"""Every figure of the pipeline, one function each, drawn from a stage's artifacts alone.

A stage's notebook calls its figures' functions once it has written the files they read (``run.figure``),
and ``python -m moe2lib figures`` calls the same functions on the stored artifacts, so the two cannot
draw differently. Each function takes the artifacts folder and returns a matplotlib Figure; :func:`save`
writes it as ``<the function's name>.png`` (plus ``_<arg>`` for each extra argument), and
:func:`of_stage` lists the figures a stage's artifacts make. Only what a figure needs is imported, inside
its function, so redrawing loads no model library.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.scores import Scores, align, concat_experts, letter_bias, task_accuracy
from ..errors import InputError
from ..infra import artifacts


def _need(path) -> Path:
    """``path``, or InputError when it is absent."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", path=path)
    return path


def _read_json(path):
    return artifacts.read_json(_need(path))


def _nan(x) -> float:
    """A JSON number back to a float; null (NaN or infinity when written) to NaN."""
    return math.nan if x is None else float(x)


# --------------------------------------------------------------------------- base_models

def base_models_task_accuracy(art):
    """Per-task accuracy above chance of the base models' choice scores."""
    scores = Scores.load(_need(Path(art) / "base_models" / "scores.npz"))
    return _task_accuracy_figure(scores, "Base models: accuracy above chance per task")


def base_models_letter_bias(art):
    """MMLU asked for the answer letter: the share of answers per letter against the correct ones."""
    letter = Scores.load(_need(Path(art) / "base_models" / "scores_mmlu_letter.npz"))
    return _letter_bias_figure(letter, "Base models on MMLU, asked for the letter: answer-letter bias")


# --------------------------------------------------------------------------- clustering

def _cluster_labels(d: Path) -> tuple[dict, list[str]]:
    cz = artifacts.read_npz(_need(d / "clusters.npz"))
    metrics = _read_json(d / "metrics.json")
    return cz, [c["label"] for c in sorted(metrics["clusters"], key=lambda c: c["cluster"])]


def clustering_umap(art):
    """The UMAP map of the gating-training and test prompts, coloured by cluster (labels from metrics.json)."""
    from ..models import clustering

    d = Path(art) / "clustering"
    cz, labels = _cluster_labels(d)
    umap = artifacts.read_npz(_need(d / "umap.npz"))
    return clustering.umap_figure(umap["xy"], umap["cluster"], len(cz["centroids"]), labels,
                                  "Gating-training and test prompts by cluster (UMAP)")


def clustering_subjects(art):
    """Share of each task's gating-training and test prompts in each cluster."""
    from ..models import clustering

    cz, labels = _cluster_labels(Path(art) / "clustering")
    return clustering.task_heatmap(cz["eval_task"], cz["eval_cluster"], len(cz["centroids"]), labels,
                                   "Tasks x prompt clusters")


# --------------------------------------------------------------------------- experts

def experts_training_curves(art):
    """Each expert's LoRA training loss per step, from the history.json beside its peft adapter."""
    from ..models import finetune

    d = Path(art) / "experts"
    runs, target = {}, "letter"
    for e in _read_json(d / "experts.json"):
        peft = d / e.get("peft_dir", f"peft/{e['name']}")
        role = e.get("role") or finetune.paper_role(e["base_model"], e["cluster"])
        runs[e["name"]] = (role, _read_json(peft / "history.json"))
        target = _read_json(peft / finetune.DONE)["params"].get("target", "letter")
    return finetune.expert_curves_figure(runs, target)


# --------------------------------------------------------------------------- scoring

def scoring_task_accuracy(art):
    """Who knows what: base models (first columns), experts and generalists (if trained), accuracy above
    chance per task."""
    art = Path(art)
    scores = Scores.load(_need(art / "scoring" / "scores.npz"))
    base_path = _need(art / "base_models" / "scores.npz")
    base = align(Scores.load(base_path), scores.qid, path=base_path)
    gen_path = art / "scoring" / "generalists.npz"
    if not gen_path.exists():
        return _task_accuracy_figure(concat_experts(base, scores),
                                     "Base models and experts: accuracy above chance per task")
    gen = align(Scores.load(gen_path), scores.qid, path=gen_path)
    return _task_accuracy_figure(concat_experts(base, scores, gen),
                                 "Base models, experts and generalists: accuracy above chance per task")


def scoring_cluster_delta(art):
    """Each expert's accuracy minus its base model's per prompt cluster (metrics.json); boxed: its own cluster."""
    from ..models import clustering

    metrics = _read_json(Path(art) / "scoring" / "metrics.json")
    rows = metrics["experts"]
    delta = np.array([[_nan(x) for x in e["cluster_delta"]] for e in rows])
    return clustering.specialisation_heatmap(delta, metrics["cluster_counts"], [e["name"] for e in rows],
                                             [e["cluster"] for e in rows],
                                             "Expert accuracy minus its base model's, per prompt cluster")


# --------------------------------------------------------------------------- profiles

def _expert_names(art: Path) -> list[str]:
    """Names in experts.json, read without checking that the adapters are there (they are not tracked)."""
    path = art / "experts" / "experts.json"
    return [e["name"] for e in artifacts.read_json(path)] if path.exists() else []


def _profiles(art: Path) -> dict:
    from ..models import profiling

    return profiling.load_profiles(_need(art / "profiles" / "profiles.json"), _expert_names(art))


def profiles_fig5(art):
    """Fig. 5: delay and energy against prompt length, this machine and the emulated paper testbed."""
    from ..models import profiling

    return profiling.fig5_figure(_profiles(Path(art)))


def profiles_fit(art):
    """Every measured repetition against the fitted delay model (4)-(6)."""
    from ..models import profiling

    return profiling.fit_figure(_profiles(Path(art)), "measured")


# --------------------------------------------------------------------------- gating

def gating_training(art):
    """The gating network's training and validation loss per epoch (gating.json)."""
    from . import evaluation

    net = _read_json(Path(art) / "gating" / "gating.json")
    return evaluation.training_figure(net["history"], net["best_epoch"])


def gating_fig3(art):
    """Fig. 3 on the test questions, with 95% bootstrap intervals (metrics.json)."""
    from . import evaluation

    metrics = _read_json(Path(art) / "gating" / "metrics.json")
    return evaluation.fig3_figure(metrics, f"{metrics.get('benchmark', 'MMLU')} accuracy (test split), "
                                           "95% bootstrap intervals")


def gating_theorems(art):
    """Theorem 1 (renormalised vs retrained subsets) and Theorem 2 (nested chains) on the test split."""
    from . import evaluation

    metrics = _read_json(Path(art) / "gating" / "metrics.json")
    return evaluation.theorems_figure(metrics["theorem1"], metrics["theorem2"]["test"])


# --------------------------------------------------------------------------- tables

def tables_heatmaps(art):
    """Every table's accuracies under delay x energy budgets, from metrics.json's cell records."""
    from . import tables

    return tables.heatmap_figure(_read_json(Path(art) / "tables" / "metrics.json")["tables"])


def tables_pareto(art, mode: str):
    """Accuracy of every subset against its energy and delay under ``mode``'s costs, and the Pareto fronts.

    The accuracies are recomputed (no model: a fused argmax) from the scoring, gating and profiles
    artifacts, with the tables stage's ``app_class`` and ``top_k`` (its meta.json, else its notebook's).
    """
    from ..core import costmodel
    from ..models import profiling
    from . import tables

    art = Path(art)
    params = _tables_params(art)
    app_class = params["app_class"]
    _, test, experts = tables.load_splits(_need(art / "scoring" / "scores.npz"), _need(art / "gating" / "gate.npz"))
    profiles = profiling.load_profiles(_need(art / "profiles" / "profiles.json"), experts)
    cost = costmodel.cost_arrays(profiles, mode, app_class, experts)
    masks, delay, energy, acc = tables.all_subsets(test, *cost, top_k=params["top_k"])
    source = ", ".join(sorted({e["classes"][app_class]["energy_source"] for e in profiles["modes"][mode].values()}))
    return tables.pareto_figure(masks, delay, energy, acc, f"{mode} ({source})")


def _tables_params(art: Path) -> dict:
    """The tables stage's parameters: as recorded in its meta.json once it has finished, else (inside the
    running notebook) its metrics.json's copy."""
    meta = artifacts.read_meta(art / "tables")
    if meta is not None:
        return meta["params"]
    return _read_json(art / "tables" / "metrics.json")["params"]


# --------------------------------------------------------------------------- fusion

def fusion_steps(art):
    """The fused generation's first steps: fused probabilities of the top candidates and each expert's."""
    from ..core import fusion

    return fusion.steps_figure(_read_json(Path(art) / "fusion" / "trace.json")["steps"])


# --------------------------------------------------------------------------- drawn from scores

def _task_accuracy_figure(scores: Scores, title: str):
    """Who knows what: each model's accuracy minus chance per task (points), annotated, tasks as rows."""
    import matplotlib.pyplot as plt

    tasks, acc, chance, counts = task_accuracy(scores)
    delta = 100 * (acc - chance[None, :])
    lim = max(10.0, float(np.nanmax(np.abs(delta))))
    fig, ax = plt.subplots(figsize=(0.75 * acc.shape[0] + 4, 0.3 * len(tasks) + 1.8))
    im = ax.imshow(delta.T, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
    for t in range(len(tasks)):
        for j in range(acc.shape[0]):
            ax.text(j, t, f"{100 * acc[j, t]:.0f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(tasks)), [f"{t} (n={n}, chance {100 * c:.0f})" for t, n, c in zip(tasks, counts, chance)],
                  fontsize=7)
    overall = scores.accuracy()
    ax.set_xticks(range(acc.shape[0]), [f"{e}\n{100 * a:.1f}%" for e, a in zip(scores.experts, overall)],
                  fontsize=6, rotation=45, ha="right")
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("accuracy minus chance (points); numbers: accuracy %")
    ax.set_title(f"{title} (n={scores.n})", fontsize=9)
    return fig


def _letter_bias_figure(scores: Scores, title: str):
    """Share of answers per letter for each expert against the share of correct answers per letter."""
    import matplotlib.pyplot as plt

    from ..data.loaders import LETTERS

    chosen, gold = letter_bias(scores)
    k, c = chosen.shape
    fig, ax = plt.subplots(figsize=(1.2 * c * max(1, k / 2) + 3, 3.5))
    width = 0.8 / k
    x = np.arange(c)
    for j in range(k):
        ax.bar(x + (j - (k - 1) / 2) * width, chosen[j], width, label=str(scores.experts[j]))
    ax.step(np.r_[x - 0.5, c - 0.5], np.r_[gold, gold[-1]], where="post", color="k", lw=1.5,
            label="correct answers")
    ax.set_xticks(x, list(LETTERS[:c]))
    ax.set_ylabel("share of answers")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title} (n={scores.n})")
    return fig


# --------------------------------------------------------------------------- drawing and saving

def filename(draw: Callable, *args) -> str:
    """The file a figure is saved as: its function's name, then ``_<arg>`` per argument, ``.png``."""
    return "_".join([draw.__name__, *map(str, args)]) + ".png"


def write_png(fig, target) -> None:
    """Save ``fig`` atomically as ``target`` (PNG, 130 dpi, tight bounding box), as every figure is saved."""
    with artifacts.atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")


def save(draw: Callable, artifacts_dir, figures_dir, *args):
    """Draw one figure from the artifacts under ``artifacts_dir`` and save it into ``figures_dir``
    (:func:`write_png`); returns the figure, still open."""
    fig = draw(Path(artifacts_dir), *args)
    write_png(fig, Path(figures_dir) / filename(draw, *args))
    return fig


def of_stage(stage: str, artifacts_dir) -> list[tuple[Callable, tuple]]:
    """The figures a finished stage's artifacts make, in order: (function, extra arguments) pairs.

    The letter-bias figure is there when MMLU was scored by the letter, the fit figure when the measured
    profile was built, one Pareto figure per profile mode of the tables stage.
    """
    art = Path(artifacts_dir)
    if stage == "base_models":
        letter = (art / "base_models" / "scores_mmlu_letter.npz").exists()
        return [(base_models_task_accuracy, ())] + ([(base_models_letter_bias, ())] if letter else [])
    if stage == "profiles":
        measured = "measured" in _profiles(art)["modes"]
        return [(profiles_fig5, ())] + ([(profiles_fit, ())] if measured else [])
    if stage == "tables":
        return [(tables_heatmaps, ())] + [(tables_pareto, (mode,)) for mode in _tables_params(art)["modes"]]
    found = {"clustering": [clustering_umap, clustering_subjects], "experts": [experts_training_curves],
             "scoring": [scoring_task_accuracy, scoring_cluster_delta],
             "gating": [gating_training, gating_fig3, gating_theorems], "fusion": [fusion_steps]}
    if stage not in found:
        raise InputError(f"unknown stage {stage!r}", param="stage")
    return [(draw, ()) for draw in found[stage]]


def ablation_rows(rows: list[dict]):
    """Own-cluster gain, own-minus-other gain and MoE2 − S.A. per ablation row, in points (validation)."""
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    keys = (("own_gain", "own-cluster gain"), ("own_minus_other", "own − other"), ("moe2_minus_sa", "MoE2 − S.A."))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    for i, (k, label) in enumerate(keys):
        ax.barh(y + (i - 1) * 0.27, [100 * r[k] for r in rows], height=0.27, label=label)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("points (validation questions)")
    ax.legend(fontsize=7)
    ax.set_title("How the experts are made: one change at a time", fontsize=9)
    fig.tight_layout()
    return fig


def ablation(artifacts_dir):
    """The ablation's figure (:func:`ablation_rows`) from ``ablation/ablation.json`` (``python -m moe2lib ablate``)."""
    return ablation_rows(_read_json(Path(artifacts_dir) / "ablation" / "ablation.json")["rows"])
