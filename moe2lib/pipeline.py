"""The papermill pipeline: one notebook per stage, parameters from ``configs/<profile>.yaml``.

A stage folder ``artifacts/<stage>/`` is complete when its ``meta.json`` exists; the pipeline
adds to it a key over the stage's parameters, its notebook, the library source and the meta of
the stages it reads. A stage whose key is unchanged is skipped; ``force`` reruns it.
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import artifacts
from .errors import InputError

REPO = artifacts.REPO_ROOT
NOTEBOOKS = REPO / "notebooks"
CONFIGS = REPO / "configs"
PROFILES = ("smoke", "default", "paper")
SHARED_KEYS = {"seed": int, "data_dir": (str, type(None)), "n_threads": int, "n_questions": int}


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    reads: tuple[str, ...] = ()
    doc: str = ""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("base_models", "01_base_models.ipynb", (),
          "score the packaged base models on an MMLU sample; per-subject accuracy and letter bias"),
    Stage("clustering", "02_clustering.ipynb", (),
          "embed the fine-tuning and MMLU prompts, k-means into 8 clusters; UMAP and subject heatmap (Fig. 6)"),
    Stage("experts", "03_experts.ipynb", ("clustering",),
          "LoRA-fine-tune one expert per cluster (Table V), export GGUF adapters, write experts.json (Table I)"),
    Stage("scoring", "04_scoring.ipynb", ("base_models", "clustering", "experts"),
          "score every expert on the MMLU sample; per-cluster accuracy against its base model"),
    Stage("profiles", "05_profiling.ipynb", ("experts",),
          "delay and energy vs prompt length (Fig. 5), the delay model (4)-(6), profiles.json"),
    Stage("gating", "06_gating.ipynb", ("base_models", "scoring"),
          "gating network (eq. 1), Fig. 3 baselines with bootstrap intervals, Theorem 1-2 checks"),
    Stage("tables", "07_tables.ipynb", ("scoring", "gating", "profiles"),
          "SMO subsets and Top-k inference under delay x energy budgets (Tables II-IV), Pareto fronts"),
    Stage("fusion", "08_fusion.ipynb", ("experts",),
          "one token-level fused generation across real llama.cpp servers, step by step (Alg. 3)"),
)}


def out_root(profile: str) -> Path:
    """Where a profile's artifacts and figures go: the repository for ``default``, else ``runs/<profile>``."""
    return REPO if profile == "default" else REPO / "runs" / profile


def load_config(profile_or_path: str) -> tuple[dict, Path]:
    import yaml

    path = Path(profile_or_path)
    if not path.suffix:
        path = CONFIGS / f"{profile_or_path}.yaml"
    if not path.exists():
        raise InputError(f"no such profile; known: {', '.join(PROFILES)}", path=path, param="profile")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"invalid YAML ({getattr(exc, 'problem', exc)})", path=path,
                         line=None if mark is None else mark.line + 1) from None
    if not isinstance(cfg, dict):
        raise InputError("a profile is a mapping of parameters", path=path)
    for key, value in cfg.items():
        if key in SHARED_KEYS:
            if not isinstance(value, SHARED_KEYS[key]) or isinstance(value, bool):
                raise InputError(f"{key} has the wrong type {type(value).__name__}", path=path, param=key)
        elif key in STAGES:
            if not isinstance(value, dict):
                raise InputError("a stage's entry is a mapping of its notebook's parameters", path=path, param=key)
        elif key != "profile":
            raise InputError(f"unknown key; allowed: profile, {', '.join(SHARED_KEYS)}, "
                             f"and the stages {', '.join(STAGES)}", path=path, param=key)
    return cfg, path


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


_TYPES_EQUIVALENT = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def stage_params(cfg: Mapping, cfg_path: Path, stage: Stage, profile: str, root: Path) -> dict[str, Any]:
    """Shared keys and the stage's own entry, checked against the notebook's parameters cell."""
    defaults = notebook_parameters(stage)
    params = {k: cfg[k] for k in SHARED_KEYS if k in cfg and k in defaults}
    for key, value in (cfg.get(stage.name) or {}).items():
        if key not in defaults:
            raise InputError(f"stage {stage.name!r} has no parameter {key!r}; its parameters: "
                             f"{', '.join(sorted(defaults))}", path=cfg_path, param=f"{stage.name}.{key}")
        want = type(defaults[key])
        if defaults[key] is not None and value is not None and want in _TYPES_EQUIVALENT and (
                not isinstance(value, _TYPES_EQUIVALENT[want]) or (isinstance(value, bool) and want is not bool)):
            raise InputError(f"expected {want.__name__}, got {type(value).__name__} {value!r}",
                             path=cfg_path, param=f"{stage.name}.{key}")
        params[key] = value
    params.update(profile=profile, artifacts_dir=str(root / "artifacts"), figures_dir=str(root / "figures"))
    return {k: v for k, v in params.items() if k in defaults}


def library_digest() -> str:
    return artifacts.digest({p.name: artifacts.file_sha256(p) for p in sorted((REPO / "moe2lib").glob("*.py"))})


def stage_key(stage: Stage, params: Mapping, root: Path) -> str:
    upstream = {}
    for name in stage.reads:
        meta = artifacts.read_meta(root / "artifacts" / name)
        upstream[name] = None if meta is None else meta.get("pipeline", {}).get("key")
    portable = {k: v for k, v in params.items() if k not in ("artifacts_dir", "figures_dir")}
    return artifacts.digest({"params": portable, "notebook": artifacts.file_sha256(NOTEBOOKS / stage.notebook),
                             "library": library_digest(), "upstream": upstream})


def reproduce(profile: str = "default", *, stages=None, force: bool = False, out: Path | None = None,
              log=print) -> dict[str, str]:
    """Run the stages in order; returns each stage's outcome ("ran" or "skipped")."""
    import papermill

    cfg, cfg_path = load_config(profile)
    name = cfg.get("profile", Path(profile).stem)
    root = Path(out) if out else out_root(name)
    chosen = list(STAGES) if not stages else list(stages)
    for s in chosen:
        if s not in STAGES:
            raise InputError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}", param="stages")
    outcome = {}
    for sname in chosen:
        stage = STAGES[sname]
        params = stage_params(cfg, cfg_path, stage, name, root)
        key = stage_key(stage, params, root)
        stage_dir = root / "artifacts" / sname
        meta = artifacts.read_meta(stage_dir)
        if not force and meta and meta.get("pipeline", {}).get("key") == key:
            log(f"[{sname}] up to date (inputs and parameters unchanged): skipped")
            outcome[sname] = "skipped"
            continue
        (stage_dir / artifacts.META_NAME).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (root / "figures").mkdir(parents=True, exist_ok=True)
        log(f"[{sname}] running {stage.notebook} ({name} profile)")
        t0 = time.time()
        executed = stage_dir / stage.notebook
        with artifacts.atomic_path(executed) as tmp:
            papermill.execute_notebook(str(NOTEBOOKS / stage.notebook), str(tmp), parameters=params,
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                                       log_output=True)
        wall = time.time() - t0
        meta = artifacts.read_meta(stage_dir)
        if meta is None:
            raise RuntimeError(f"{stage.notebook} finished without writing {stage_dir / artifacts.META_NAME}")
        meta["pipeline"] = {"key": key, "profile": name, "config": str(cfg_path.relative_to(REPO))
                            if cfg_path.is_relative_to(REPO) else str(cfg_path),
                            "notebook": stage.notebook, "wall_time_s": round(wall, 1)}
        artifacts.write_json(stage_dir / artifacts.META_NAME, meta)
        log(f"[{sname}] done in {wall:.0f} s")
        outcome[sname] = "ran"
    return outcome


class StageRun:
    """Bookkeeping of one stage inside its notebook: output paths, timing, and meta.json at the end."""

    def __init__(self, name: str, artifacts_dir, figures_dir, params: Mapping[str, Any]):
        self.name = name
        self.dir = Path(artifacts_dir) / name
        self.figures = Path(figures_dir)
        self.params = dict(params)
        self.t0 = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(parents=True, exist_ok=True)
        (self.dir / artifacts.META_NAME).unlink(missing_ok=True)

    def path(self, filename: str) -> Path:
        return self.dir / filename

    def figure(self, fig, filename: str) -> Path:
        """Save a matplotlib figure atomically into the figures folder."""
        target = self.figures / filename
        with artifacts.atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix.lstrip("."), dpi=130, bbox_inches="tight")
        return target

    def finish(self, inputs=(), **extra) -> dict:
        return artifacts.write_meta(self.dir, params=self.params, inputs=inputs,
                                    wall_time_s=time.time() - self.t0, **extra)
