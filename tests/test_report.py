"""Figures and tables redrawn from the smoke run's artifacts match what its notebooks wrote."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe2lib.core import fusion
from moe2lib.errors import InputError
from moe2lib.infra import artifacts
from moe2lib.pipeline import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def redrawn(smoke_run, tmp_path_factory):
    """The smoke artifacts as a fresh clone has them (no notebooks, adapters or weights; git ignores
    those), the tables' CSV and Markdown removed, then regenerated: (notebook run root, copy root, report)."""
    root = smoke_run[0]
    copy = tmp_path_factory.mktemp("redrawn")
    shutil.copytree(root / "artifacts", copy / "artifacts",
                    ignore=shutil.ignore_patterns("*.ipynb", "*.gguf", "*.safetensors"))
    for p in [*(copy / "artifacts" / "tables").glob("*.csv"), copy / "artifacts" / "tables" / "tables.md"]:
        p.unlink()
    logs = []
    done = report.regenerate(copy / "artifacts", copy / "figures", log=logs.append)
    return root, copy, done, logs


def _pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


@pytest.mark.slow  # needs the smoke run
def test_every_notebook_figure_is_redrawn_identically(redrawn):
    root, copy, done, logs = redrawn
    assert not done.skipped
    notebook = {p.name for p in (root / "figures").glob("*.png")}
    figures = [p for p in done.written if p.suffix == ".png"]
    assert sorted(p.name for p in figures) == sorted(notebook)
    for p in figures:
        assert p.parent == copy / "figures" and p.read_bytes()[:8] == PNG, p.name
        np.testing.assert_array_equal(_pixels(p), _pixels(root / "figures" / p.name), err_msg=p.name)
    assert done.seconds < 60


@pytest.mark.slow  # needs the smoke run
def test_tables_are_rewritten_byte_for_byte(redrawn):
    root, copy, done, _ = redrawn
    src, out = root / "artifacts" / "tables", copy / "artifacts" / "tables"
    names = sorted(p.name for p in src.glob("*.csv")) + ["tables.md"]
    assert len(names) == 7 and sorted(p.name for p in done.written if p.parent == out) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


@pytest.mark.slow  # needs the smoke run
def test_cli_loads_no_model_library(redrawn):
    _, copy, _, _ = redrawn
    code = ("import sys; from moe2lib.__main__ import main; rc = main(sys.argv[1:]); "
            "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'llama_cpp', 'transformers', 'sentence_transformers', 'peft', 'umap'})); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "figures", "--profile", "smoke", "--out", str(copy)],
                         capture_output=True, text=True, cwd=artifacts.REPO_ROOT)
    assert run.returncode == 0, run.stderr
    assert "heavy: []" in run.stdout
    assert "wrote " in run.stdout and "tables_pareto_measured.png" in run.stdout
    assert " files written in " in run.stdout


@pytest.mark.slow  # needs the smoke run
def test_absent_artifacts_skip_their_stage(redrawn, tmp_path):
    _, copy, _, _ = redrawn
    logs = []
    done = report.regenerate(tmp_path / "none", tmp_path / "figures", ["base_models", "gating"], log=logs.append)
    assert not done.written and set(done.skipped) == {"base_models", "gating"} and len(logs) == 2
    assert not (tmp_path / "figures").exists()
    shutil.copytree(copy / "artifacts" / "gating", tmp_path / "art" / "gating")
    (tmp_path / "art" / "gating" / "gating.json").unlink()
    done = report.regenerate(tmp_path / "art", tmp_path / "figures", ["gating"], log=logs.append)
    assert not done.written and "gating.json: not found" in done.skipped["gating"]
    with pytest.raises(InputError, match="unknown stages"):
        report.regenerate(tmp_path / "art", tmp_path / "figures", ["nope"])
    done = report.regenerate(tmp_path / "art", tmp_path / "figures", ["ablation"], log=logs.append)
    assert not done.written and "ablation.json: not found" in done.skipped["ablation"]


@pytest.mark.slow  # needs the smoke run
def test_fusion_figure_draws_the_steps_a_trace_has(smoke_run):
    import matplotlib.pyplot as plt

    trace = json.loads((smoke_run[0] / "artifacts" / "fusion" / "trace.json").read_text())
    fig = fusion.steps_figure(trace["steps"][:3])
    assert sum(ax.axison for ax in fig.axes) == 3
    plt.close(fig)


def _same_picture(a: Path, b: Path) -> bool:
    """Byte-identical PNGs, or the same size with no pixel off by more than 2 of 255 levels: numpy's
    log and power kernels differ in the last bit between AVX2 and AVX-512 CPUs, which moves the
    anti-aliasing of a point on a log axis by a level or two, never a mark or a label."""
    import matplotlib.image as mpimg

    if a.read_bytes() == b.read_bytes():
        return True
    x, y = mpimg.imread(a), mpimg.imread(b)
    return x.shape == y.shape and float(np.abs(x - y).max()) <= 2 / 255 + 1e-6


def test_committed_figures_and_tables_are_redrawn_byte_for_byte(tmp_path):
    """The default run's committed artifacts give back its committed figures (pixel for pixel, see
    :func:`_same_picture`) and tables (byte for byte)."""
    repo = artifacts.REPO_ROOT
    shutil.copytree(repo / "artifacts", tmp_path / "artifacts")
    done = report.regenerate(tmp_path / "artifacts", tmp_path / "figures", log=lambda _: None)
    assert not done.skipped
    committed = sorted(p.name for p in (repo / "figures").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == committed and len(committed) == 17
    for name in committed:
        assert _same_picture(tmp_path / "figures" / name, repo / "figures" / name), name
    for p in [*(repo / "artifacts" / "tables").glob("*.csv"), repo / "artifacts" / "tables" / "tables.md"]:
        assert (tmp_path / "artifacts" / "tables" / p.name).read_bytes() == p.read_bytes(), p.name


def test_each_notebook_draws_the_figures_the_command_draws():
    """Every stage notebook calls exactly the moe2lib.analysis.figures functions that `figures` calls for its stage."""
    import re

    from moe2lib.analysis import figures
    from moe2lib.pipeline import runner

    for name, stage in runner.STAGES.items():
        nb = json.loads((runner.NOTEBOOKS / stage.notebook).read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        called = set(re.findall(r"run\.figure\(figures\.(\w+)", code))
        drawn = {draw.__name__ for draw, _ in figures.of_stage(name, artifacts.REPO_ROOT / "artifacts")}
        assert called == drawn, name
        assert "_figure(" not in code, f"{name} draws a figure other than through moe2lib.analysis.figures"
