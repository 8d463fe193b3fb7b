"""Every figure and table of the pipeline redrawn from the stored artifacts alone (``python -m moe2lib figures``).

Each stage's figures are drawn and saved by the functions of :mod:`moe2lib.analysis.figures` that its notebook
calls, from the files the notebook wrote (and, where a figure needs them, its upstream stages' files), so
a figure can be restyled or a table reformatted without running a model. Nothing here loads a model,
starts a server or trains: a whole profile takes seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..analysis import figures
from ..errors import InputError
from ..infra import artifacts
from .stages import STAGES


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

    def figure(self, draw: Callable, art: Path, *args) -> None:
        """One figure, drawn from ``art`` and saved by :func:`figures.save`, then closed."""
        import matplotlib.pyplot as plt

        plt.close(figures.save(draw, art, self.figures, *args))
        self.wrote(self.figures / figures.filename(draw, *args))

    def figures_of(self, stage: str, art: Path) -> None:
        """Every figure of ``stage``, drawn and saved by the functions its notebook calls."""
        for draw, args in figures.of_stage(stage, art):
            self.figure(draw, art, *args)


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def rewrite_tables(art: Path, out: Writer) -> None:
    """The tables stage's CSV and Markdown tables, rewritten in place from metrics.json's cell records."""
    from ..analysis import tables

    d = art / "tables"
    params = artifacts.read_json(d / artifacts.META_NAME)["params"]
    path = d / "metrics.json"
    if not path.exists():
        raise InputError("not found", path=path)
    results = artifacts.read_json(path)["tables"]
    names = [f"{mode}_delay-{label}"
             for mode in params["modes"] for label in tables.delay_labels(params["delay_budgets"])]
    for name in names:
        if name not in results:
            raise InputError(f"no table {name!r}; it has {', '.join(results)}", path=path)
    for written in tables.write_tables(d, {name: results[name] for name in names}):
        out.wrote(written)


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
    from, is skipped with one line in ``log``. ``ablation`` (not a stage) redraws the ablation's figure from
    ``ablation/ablation.json``; it is part of the default when that file exists.
    """
    t0 = time.perf_counter()
    art = Path(artifacts_dir)
    chosen = list(STAGES) if stages is None else list(stages)
    unknown = [s for s in chosen if s not in STAGES and s != "ablation"]
    if unknown:
        raise InputError(f"unknown stages {unknown}; stages: {', '.join(STAGES)}, ablation", param="stages")
    if stages is None and (art / "ablation" / "ablation.json").exists():
        chosen.append("ablation")
    out = Writer(figures_dir, log)
    report = Report(written=out.written)
    for name in chosen:
        if name == "ablation":  # not a stage: `ablate` writes ablation.json, no meta.json
            try:
                out.figure(figures.ablation, art)
            except (InputError, KeyError, ValueError) as exc:
                report.skipped[name] = str(exc)
                log(f"[{name}] skipped: {exc}")
            continue
        if artifacts.read_meta(art / name) is None:
            report.skipped[name] = f"no {art / name / artifacts.META_NAME} (the stage has not run to its end)"
            log(f"[{name}] skipped: {report.skipped[name]}")
            continue
        before = len(out.written)
        try:
            if name == "tables":
                rewrite_tables(art, out)
            out.figures_of(name, art)
        except (InputError, KeyError, ValueError) as exc:  # absent, outdated or damaged: the other stages go on
            report.skipped[name] = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            done = len(out.written) - before
            log(f"[{name}] {f'stopped after {done} files' if done else 'skipped'}: {exc}")
    report.seconds = time.perf_counter() - t0
    return report
