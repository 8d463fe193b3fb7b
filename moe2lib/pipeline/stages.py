"""What a stage is, and its bookkeeping inside its own notebook.

:data:`STAGES` names each stage's notebook and the stages it reads; :func:`notebook_parameters` reads a
notebook's parameters cell; :class:`StageRun`, created at the top of every stage notebook, records the
parameters, draws the figures and writes meta.json, with :func:`recorded_uses`: the library modules and
data files the stage used, which its key in :mod:`moe2lib.pipeline.runner` covers. Every stage imports this
module, so it holds only that: editing how profiles are loaded or stages run (``pipeline``) reruns no stage.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError
from ..infra import artifacts

NOTEBOOKS = artifacts.REPO_ROOT / "notebooks"
PATH_PARAMS = ("artifacts_dir", "figures_dir")  # where a run writes; not part of what it computes


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    reads: tuple[str, ...] = ()
    doc: str = ""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("base_models", "01_base_models.ipynb", (),
          "score the packaged base models on the benchmark's gating-training and test questions; per-task accuracy, "
          "MMLU letter bias"),
    Stage("clustering", "02_clustering.ipynb", (),
          "embed the benchmark's expert-training prompts, k-means into 8 clusters, assign every other question; UMAP "
          "and task heatmap (Fig. 6)"),
    Stage("experts", "03_experts.ipynb", ("clustering",),
          "LoRA-fine-tune one expert per cluster (Table V), export GGUF adapters, write experts.json (Table I)"),
    Stage("scoring", "04_scoring.ipynb", ("base_models", "clustering", "experts"),
          "score every expert on the gating-training and test questions; per-cluster accuracy against its base model"),
    Stage("profiles", "05_profiles.ipynb", ("experts",),
          "delay and energy vs prompt length (Fig. 5), the delay model (4)-(6), profiles.json"),
    Stage("gating", "06_gating.ipynb", ("base_models", "scoring"),
          "gating network (eq. 1), Fig. 3 baselines with bootstrap intervals, Theorem 1-2 checks"),
    Stage("tables", "07_tables.ipynb", ("scoring", "gating", "profiles"),
          "SMO subsets and Top-k inference under delay x energy budgets (Tables II-IV), Pareto fronts"),
    Stage("fusion", "08_fusion.ipynb", ("experts",),
          "one token-level fused generation across real llama.cpp servers, step by step (Alg. 3)"),
)}


def notebook_parameters(stage: Stage) -> dict[str, Any]:
    """The parameters cell of a stage's notebook: name -> default value."""
    import papermill

    path = NOTEBOOKS / stage.notebook
    found = papermill.inspect_notebook(str(path))
    # papermill skips (with only a log line) an assignment it cannot parse; here that is an error
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    for i, line in enumerate("".join(cell["source"]).splitlines() if cell else [], start=1):
        m = re.match(r"([A-Za-z_]\w*)\s*=", line)
        if m and m.group(1) not in found:
            raise InputError(f"line {i} of the parameters cell is not a `name = literal  # comment` papermill "
                             f"can read: {line.strip()!r}", path=path, param=m.group(1))
    out = {}
    for name, info in found.items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            raise InputError(f"parameter {name!r} must default to a literal, not {info['default']!r}",
                             path=path, param=name) from None
    return out


def recorded_uses() -> dict[str, dict[str, str]]:
    """What this process has used so far, with each file's sha256: ``library``, the moe2lib modules it or
    a worker it started (:func:`moe2lib.infra.parallel.worker_modules`) imported; ``data``, the data files it
    read (:func:`moe2lib.data.loaders.files_read`). Paths as :func:`moe2lib.infra.artifacts.portable_path` writes them.

    Recorded by ``StageRun.finish`` into meta.json, it is what a stage's key covers besides its parameters,
    notebook and upstream stages: a module the stage never imported cannot make it rerun.
    """
    import importlib.util

    names = {m for m in sys.modules if m.split(".")[0] == "moe2lib"}
    if "moe2lib.infra.parallel" in sys.modules:
        names |= sys.modules["moe2lib.infra.parallel"].worker_modules()
    files = set()
    for name in names:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) or getattr(importlib.util.find_spec(name), "origin", None)
        if origin:
            files.add(Path(origin))
    data = sys.modules.get("moe2lib.data.loaders")
    return {"library": artifacts.input_hashes(sorted(files)),
            "data": artifacts.input_hashes(data.files_read() if data else [])}


class StageRun:
    """Bookkeeping of one stage inside its notebook: output paths, figures, timing, and meta.json at the end.

    ``namespace`` is the notebook's ``globals()``: the parameters recorded are the names of the stage
    notebook's parameters cell, read from the notebook file, with their values in the namespace (those
    papermill injected, else the defaults), so the record cannot miss or misspell one.
    """

    def __init__(self, name: str, namespace: Mapping[str, Any]):
        if name not in STAGES:
            raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", param="name")
        names = notebook_parameters(STAGES[name])
        missing = [k for k in names if k not in namespace]
        if missing:
            raise InputError(f"the namespace lacks the parameters {missing}; pass the notebook's globals()",
                             path=NOTEBOOKS / STAGES[name].notebook, param=missing[0])
        self.name = name
        self.params = {k: namespace[k] for k in names if k not in PATH_PARAMS}
        self.artifacts = Path(namespace["artifacts_dir"])
        self.dir = self.artifacts / name
        self.figures = Path(namespace["figures_dir"])
        self.t0 = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(parents=True, exist_ok=True)
        (self.dir / artifacts.META_NAME).unlink(missing_ok=True)

    def path(self, filename: str) -> Path:
        return self.dir / filename

    def figure(self, draw, *args):
        """Draw a figure of :mod:`moe2lib.analysis.figures` from the artifacts written so far and save it into the
        figures folder, as ``python -m moe2lib figures`` does; returns the figure, open for display."""
        from ..analysis import figures

        return figures.save(draw, self.artifacts, self.figures, *args)

    def finish(self, inputs=(), **extra) -> dict:
        """Write meta.json, marking the stage complete; it records, besides ``inputs`` and ``extra``, the
        library modules and data files the stage used (:func:`recorded_uses`), which its key covers."""
        return artifacts.write_meta(self.dir, params=self.params, inputs=inputs,
                                    wall_time_s=time.time() - self.t0, uses=recorded_uses(), **extra)
