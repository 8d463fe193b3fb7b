"""Every figure and table of the pipeline redrawn from the stored artifacts alone (``python -m moe2lib figures``).

One function per stage (:data:`STAGES`) reads the files its notebook wrote (and, where the notebook drew
from them, its upstream stages' files) and draws with the same library functions the notebook calls, so a
figure can be restyled or a table reformatted without running a model. Nothing here loads a model, starts
a server or trains: a whole profile takes seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import artifacts
from .errors import InputError


def _need(path) -> Path:
    """``path``, or InputError when it is absent (:func:`regenerate` then skips the stage)."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", path=path)
    return path


def _read_json(path):
    return artifacts.read_json(_need(path))


def _nan(x) -> float:
    """A JSON number back to a float; null (NaN or infinity when written) to NaN."""
    return math.nan if x is None else float(x)


class Writer:
    """Where regenerated files go; ``written`` lists them in order, ``log`` is told of each."""

    def __init__(self, figures_dir, log: Callable[[str], None] = print):
        self.figures = Path(figures_dir)
        self.log = log
        self.written: list[Path] = []

    def wrote(self, path: Path) -> Path:
        """Record (and log) a file written."""
        self.written.append(path)
        self.log(f"wrote {_show(path)}")
        return path

    def figure(self, fig, filename: str) -> Path:
        """Save as the notebooks do (format, dpi, bounding box, atomic write), then close the figure."""
        import matplotlib.pyplot as plt

        from .pipeline import save_figure

        try:
            return self.wrote(save_figure(fig, self.figures / filename))
        finally:
            plt.close(fig)


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- one function per stage

def draw_base_models(art: Path, out: Writer) -> None:
    """Per-task accuracy above chance (choice scores) and, where scored, MMLU's answer-letter bias."""
    from . import plots
    from .scoring import Scores

    d = art / "base_models"
    scores = Scores.load(_need(d / "scores.npz"))
    out.figure(plots.task_accuracy_figure(scores, "Base models: accuracy above chance per task"),
               "base_models_task_accuracy.png")
    if (d / "scores_mmlu_letter.npz").exists():
        letter = Scores.load(d / "scores_mmlu_letter.npz")
        out.figure(plots.letter_bias_figure(letter, "Base models on MMLU, asked for the letter: answer-letter bias"),
                   "base_models_letter_bias.png")


def draw_clustering(art: Path, out: Writer) -> None:
    """UMAP of the evaluation prompts and the task x cluster heatmap, labels from metrics.json."""
    from . import clustering

    d = art / "clustering"
    cz = artifacts.read_npz(_need(d / "clusters.npz"))
    metrics = _read_json(d / "metrics.json")
    k = len(cz["centroids"])
    labels = [c["label"] for c in sorted(metrics["clusters"], key=lambda c: c["cluster"])]
    umap = artifacts.read_npz(_need(d / "umap.npz"))
    out.figure(clustering.umap_figure(umap["xy"], umap["cluster"], k, labels,
                                      "Gating-training and test prompts by cluster (UMAP)"), "clustering_umap.png")
    out.figure(clustering.subject_heatmap(cz["eval_task"], cz["eval_cluster"], k, labels, "Tasks x prompt clusters"),
               "clustering_subjects.png")


def draw_experts(art: Path, out: Writer) -> None:
    """LoRA training curves, from each expert's history.json beside its peft adapter."""
    from . import finetune

    d = art / "experts"
    runs = {}
    for e in _read_json(d / "experts.json"):
        role = e.get("role") or finetune.paper_role(e["base_model"], e["cluster"])
        runs[e["name"]] = (role, _read_json(d / e.get("peft_dir", f"peft/{e['name']}") / "history.json"))
    target = (_read_json(d / artifacts.META_NAME).get("params") or {}).get("target", "letter")
    out.figure(finetune.expert_curves_figure(runs, target), "experts_training_curves.png")


def draw_scoring(art: Path, out: Writer) -> None:
    """Who knows what per task (base models and experts, from their scores) and per-cluster gains (metrics.json)."""
    from . import clustering, plots, scoring
    from .scoring import Scores

    d = art / "scoring"
    metrics = _read_json(d / "metrics.json")
    scores = Scores.load(_need(d / "scores.npz"))
    base_path = _need(art / "base_models" / "scores.npz")
    base = scoring.align(Scores.load(base_path), scores.qid, path=base_path)
    out.figure(plots.task_accuracy_figure(scoring.concat_experts(base, scores),
                                          "Base models and experts: accuracy above chance per task"),
               "scoring_task_accuracy.png")
    rows = metrics["experts"]
    delta = np.array([[_nan(x) for x in e["cluster_delta"]] for e in rows])
    out.figure(clustering.specialisation_heatmap(delta, metrics["cluster_counts"], [e["name"] for e in rows],
                                                 [e["cluster"] for e in rows],
                                                 "Expert accuracy minus its base model's, per prompt cluster"),
               "scoring_cluster_delta.png")


def _expert_names(art: Path) -> list[str]:
    """Names in experts.json, read without checking that the adapters are there (they are not tracked)."""
    path = art / "experts" / "experts.json"
    return [e["name"] for e in artifacts.read_json(path)] if path.exists() else []


def draw_profiles(art: Path, out: Writer) -> None:
    """Fig. 5 and the delay model's fit, from profiles.json."""
    from . import profiling

    doc = profiling.load_profiles(_need(art / "profiles" / "profiles.json"), _expert_names(art))
    out.figure(profiling.fig5_figure(doc), "profiles_fig5.png")
    if "measured" in doc["modes"]:
        out.figure(profiling.fit_figure(doc, "measured"), "profiles_fit.png")


def draw_gating(art: Path, out: Writer) -> None:
    """Training history (gating.json), Fig. 3 and the theorem checks (metrics.json)."""
    from . import evaluation

    d = art / "gating"
    net = _read_json(d / "gating.json")
    out.figure(evaluation.training_figure(net["history"], net["best_epoch"]), "gating_training.png")
    metrics = _read_json(d / "metrics.json")
    out.figure(evaluation.fig3_figure(metrics, f"{metrics.get('benchmark', 'MMLU')} accuracy (test split), "
                                              "95% bootstrap intervals"), "gating_fig3.png")
    out.figure(evaluation.theorems_figure(metrics["theorem1"], metrics["theorem2"]["test"]), "gating_theorems.png")


def draw_tables(art: Path, out: Writer) -> None:
    """The CSV and Markdown tables and their heatmaps from metrics.json's cell records; the Pareto figures
    from every subset's accuracy, recomputed (no model: a fused argmax) from the scoring, gating and
    profiles artifacts the notebook read."""
    from . import costmodel, profiling, tables

    d = art / "tables"
    params = _read_json(d / artifacts.META_NAME)["params"]
    metrics = _read_json(d / "metrics.json")
    results = metrics["tables"]
    names = [f"{mode}_delay-{label}"
             for mode in params["modes"] for label in tables.delay_labels(params["delay_budgets"])]
    for name in names:
        if name not in results:
            raise InputError(f"no table {name!r}; it has {', '.join(results)}", path=d / "metrics.json")
    for path in tables.write_tables(d, {name: results[name] for name in names}):
        out.wrote(path)
    out.figure(tables.heatmap_figure(results), "tables_heatmaps.png")

    train, test, experts = tables.load_splits(_need(art / "scoring" / "scores.npz"),
                                              _need(art / "gating" / "gate.npz"))
    profiles = profiling.load_profiles(_need(art / "profiles" / "profiles.json"), experts)
    app_class = params["app_class"]
    for mode in params["modes"]:
        cost = costmodel.cost_arrays(profiles, mode, app_class, experts)
        masks, delay, energy, acc = tables.all_subsets(test, *cost, top_k=params["top_k"])
        source = ", ".join(sorted({e["classes"][app_class]["energy_source"] for e in profiles["modes"][mode].values()}))
        out.figure(tables.pareto_figure(masks, delay, energy, acc, f"{mode} ({source})"), f"tables_pareto_{mode}.png")


def draw_fusion(art: Path, out: Writer) -> None:
    """The fused generation's first steps, from trace.json."""
    from . import fusion

    out.figure(fusion.steps_figure(_read_json(art / "fusion" / "trace.json")["steps"]), "fusion_steps.png")


STAGES: dict[str, Callable[[Path, Writer], None]] = {
    "base_models": draw_base_models,
    "clustering": draw_clustering,
    "experts": draw_experts,
    "scoring": draw_scoring,
    "profiles": draw_profiles,
    "gating": draw_gating,
    "tables": draw_tables,
    "fusion": draw_fusion,
}


@dataclass
class Report:
    """What :func:`regenerate` did: files written and stages skipped (why)."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def regenerate(artifacts_dir, figures_dir, stages: Sequence[str] | None = None, *,
               log: Callable[[str], None] = print) -> Report:
    """Redraw the figures of ``stages`` (default: all) into ``figures_dir`` and rewrite the tables stage's
    CSV and Markdown files in place, from the artifacts under ``artifacts_dir`` alone.

    A stage without ``meta.json`` (not run, or not finished), or lacking or failing to read a file it is drawn
    from, is skipped with one line in ``log``.
    """
    t0 = time.perf_counter()
    art = Path(artifacts_dir)
    chosen = list(STAGES) if stages is None else list(stages)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise InputError(f"unknown stages {unknown}; stages: {', '.join(STAGES)}", param="stages")
    out = Writer(figures_dir, log)
    report = Report(written=out.written)
    for name in chosen:
        if artifacts.read_meta(art / name) is None:
            report.skipped[name] = f"no {art / name / artifacts.META_NAME} (the stage has not run to its end)"
            log(f"[{name}] skipped: {report.skipped[name]}")
            continue
        before = len(out.written)
        try:
            STAGES[name](art, out)
        except (InputError, KeyError, ValueError) as exc:  # absent, outdated or damaged: the other stages go on
            report.skipped[name] = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            done = len(out.written) - before
            log(f"[{name}] {f'stopped after {done} files' if done else 'skipped'}: {exc}")
    report.seconds = time.perf_counter() - t0
    return report
