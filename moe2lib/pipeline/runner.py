"""The papermill pipeline: one notebook per stage, parameters from ``configs/<profile>.yaml`` (:mod:`.config`).

A stage folder ``artifacts/<stage>/`` is complete when its ``meta.json`` exists; the pipeline
adds to it a key over the stage's parameters, its notebook, the library modules and data files the
stage recorded using (``uses``, written by ``StageRun.finish``) and the keys of the stages it reads.
A stage whose key is unchanged is skipped; ``force`` reruns it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError
from ..infra import artifacts
from .config import SHARED_KEYS, load_config, profile_benchmark, yaml_line
from .stages import NOTEBOOKS, PATH_PARAMS, STAGES, Stage, notebook_parameters

REPO = artifacts.REPO_ROOT


def out_root(profile: str) -> Path:
    """Where a profile's artifacts and figures go: the repository for ``default``, else ``runs/<profile>``."""
    return REPO if profile == "default" else REPO / "runs" / profile


_TYPES_EQUIVALENT = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,),
                     tuple: (list, tuple), dict: (dict,)}


def type_mismatch(value, default) -> str | None:
    """Why ``value`` cannot replace a notebook parameter defaulting to ``default``; None when it can.

    The default's type rules: int, float (an int is accepted), bool, str, list, dict; a bool is not a
    number; a None default accepts anything; null is accepted only where the default is None.
    """
    if default is None:
        return None
    want = type(default)
    ok = _TYPES_EQUIVALENT.get(want, (want,))
    if value is None:
        return f"expected {want.__name__}, got null"
    if not isinstance(value, ok) or (isinstance(value, bool) and want is not bool):
        return f"expected {want.__name__}, got {type(value).__name__} {value!r}"
    return None


def _bad_item(value, default) -> tuple[int, str] | None:
    """(index, why) of the first item of a list parameter that its default's items rule out.

    Checked where the default holds scalars only (each item must have one of their types, null only if
    the default has a null) or lists only (each item must be a list); other defaults leave items free.
    """
    if not isinstance(value, list) or not isinstance(default, (list, tuple)) or not default:
        return None
    if all(isinstance(d, (list, tuple)) for d in default):
        kinds = "list"
        fits = [lambda x: isinstance(x, list)]
    elif any(isinstance(d, (list, tuple, dict)) for d in default):
        return None
    else:
        scalars = [d for d in default if d is not None]
        kinds = " or ".join(sorted({type(d).__name__ for d in scalars} | ({"null"} if None in default else set())))
        fits = [lambda x, d=d: type_mismatch(x, d) is None for d in scalars]
        if None in default:
            fits.append(lambda x: x is None)
    for i, item in enumerate(value):
        if not any(f(item) for f in fits):
            return i, f"items must be {kinds}, got {'null' if item is None else type(item).__name__} {item!r}"
    return None


def _name_errors(key: str, value) -> tuple[tuple, str] | None:
    """(position within the parameter, why) of the first unknown model, device or repeated expert name."""
    from ..core import devices
    from ..models import registry

    if key == "models" and isinstance(value, list):
        for i, name in enumerate(value):
            if why := registry.unusable(name, "llm"):
                return (i,), why
    elif key == "embedding_model":
        if why := registry.unusable(value, "embedding"):
            return (), why
    elif key == "layout" and isinstance(value, list):
        names = set()
        for i, row in enumerate(value):
            if not (isinstance(row, list) and len(row) == 4):
                return (i,), f"each expert is [name, base model, cluster, device], got {row!r}"
            name, base, cluster, device = row
            if not isinstance(name, str):
                return (i, 0), f"an expert name is a string, got {name!r}"
            if name in names:
                return (i, 0), f"expert name {name!r} is given twice"
            names.add(name)
            if why := registry.unusable(base, "llm"):
                return (i, 1), why
            if not isinstance(cluster, int) or isinstance(cluster, bool) or cluster < 0:
                return (i, 2), f"a cluster is a non-negative integer, got {cluster!r}"
            if device not in devices.known():
                return (i, 3), f"unknown device {device!r}; known: {', '.join(devices.known())}"
    return None


def stage_params(cfg: Mapping, cfg_path: Path, stage: Stage, profile: str, root: Path) -> dict[str, Any]:
    """Shared keys and the stage's own entry, checked against the notebook's parameters cell.

    An unknown parameter, a value of the wrong type (see :func:`type_mismatch`), or an unknown model,
    device or repeated expert name raises InputError naming the config file, the line and the parameter.
    """
    defaults = notebook_parameters(stage)
    params = {k: cfg[k] for k in SHARED_KEYS if k in cfg and k in defaults}
    if "benchmark" in defaults and "benchmark" not in params:  # every stage builds the same questions
        params["benchmark"] = profile_benchmark("default")
    for key, value in (cfg.get(stage.name) or {}).items():
        def error(why: str, *at) -> InputError:
            return InputError(why, path=cfg_path, line=yaml_line(cfg_path, stage.name, key, *at),
                              param=f"{stage.name}.{key}" + "".join(f"[{i}]" for i in at))

        if key not in defaults:
            raise error(f"stage {stage.name!r} has no parameter {key!r}; its parameters: "
                        f"{', '.join(sorted(defaults))}")
        if why := type_mismatch(value, defaults[key]):
            raise error(why)
        if bad := _bad_item(value, defaults[key]):
            raise error(bad[1], bad[0])
        if bad := _name_errors(key, value):
            raise error(bad[1], *bad[0])
        params[key] = value
    params.update(profile=profile, artifacts_dir=str(root / "artifacts"), figures_dir=str(root / "figures"))
    return {k: v for k, v in params.items() if k in defaults}


def uses_now(meta: Mapping) -> dict[str, dict[str, str | None]] | None:
    """The modules and data files a finished stage recorded (meta.json's ``uses``), hashed as they are now
    (None for a file that is gone); None when the stage recorded none (written before they were recorded)."""
    uses = meta.get("uses")
    if not isinstance(uses, Mapping) or not {"library", "data"} <= set(uses):
        return None

    def sha(path: str) -> str | None:
        p = Path(path) if Path(path).is_absolute() else REPO / path
        return artifacts.file_sha256(p) if p.is_file() else None

    return {kind: {path: sha(path) for path in uses[kind]} for kind in ("library", "data")}


def key_parts(stage: Stage, params: Mapping, root: Path, uses: Mapping) -> dict:
    """What a stage's key is the digest of: its parameters (the notebook's defaults with ``params`` over
    them, without the output folders: what ``StageRun`` records), its notebook's sha256, the library modules
    and data files it used with their sha256 (``uses``), and the keys of the stages it reads. meta.json
    holds every part (``params``, ``uses``, ``pipeline.notebook_sha256``, ``pipeline.upstream``)."""
    upstream = {}
    for name in stage.reads:
        meta = artifacts.read_meta(root / "artifacts" / name)
        upstream[name] = None if meta is None else meta.get("pipeline", {}).get("key")
    values = {**notebook_parameters(stage), **params}
    return {"params": {k: v for k, v in values.items() if k not in PATH_PARAMS},
            "notebook": artifacts.file_sha256(NOTEBOOKS / stage.notebook),
            "library": dict(uses["library"]), "data": dict(uses["data"]), "upstream": upstream}


def stage_key(stage: Stage, params: Mapping, root: Path, uses: Mapping) -> str:
    return artifacts.digest(key_parts(stage, params, root, uses))


def profile_tasks(cfg: Mapping) -> list[str]:
    """The tasks whose files a profile reads: ``benchmark.tasks`` (edge-mix's default: every task), and
    MMLU always (the profiles stage reads ``mmlu/test`` and ``mmlu/dev``)."""
    from ..data.tasks import EDGE_MIX_DEFAULT

    bench = cfg.get("benchmark") or {}
    tasks = bench.get("tasks") or (EDGE_MIX_DEFAULT if bench.get("name", "edge-mix") == "edge-mix" else ())
    return list(dict.fromkeys(["mmlu", *tasks]))


def ensure_data(cfg: Mapping, log=print) -> Path | None:
    """Fetch the profile's data into ``./data`` when no data folder holds it, and say so; the folder, or None
    when nothing was fetched. A folder named by ``data_dir`` or ``$MOE2_DATA_DIR`` is left as it is."""
    import os

    from ..data import fetch, loaders
    from ..data.tasks import TASKS
    from ..errors import ResourceUnavailable

    if cfg.get("data_dir") or os.environ.get("MOE2_DATA_DIR"):
        return None
    tasks = [t for t in profile_tasks(cfg) if t in TASKS]  # an unknown one fails in the stage, named
    missing = []
    for path in ["mmlu/test", "mmlu/dev", *(TASKS[t].path for t in tasks if TASKS[t].fmt != "mmlu")]:
        try:
            loaders.resolve_data_dir(None, path)
        except ResourceUnavailable:
            missing.append(path)
    if not missing:
        return None
    to = Path("data").resolve()
    named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    log(f"no data folder holds {named}: fetching the profile's data into {to} "
        f"(python -m moe2lib data fetch)")
    fetch.fetch(tasks, to, log=log)
    return to


def reproduce(profile: str = "default", *, stages=None, force: bool = False, out: Path | None = None,
              log=print) -> dict[str, str]:
    """Run the stages in order; returns each stage's outcome ("ran" or "skipped").

    Without a data folder, the profile's data is fetched into ``./data`` first (:func:`ensure_data`)."""
    import os

    import papermill

    cfg, cfg_path = load_config(profile)
    name = cfg.get("profile", Path(profile).stem)
    root = Path(out) if out else out_root(name)
    chosen = list(STAGES) if not stages else list(stages)
    for s in chosen:
        if s not in STAGES:
            raise InputError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}", param="stages")
    fetched = ensure_data(cfg, log)
    if fetched is not None and fetched != (REPO / "data").resolve():  # the notebooks run in notebooks/: tell them where
        os.environ["MOE2_DATA_DIR"] = str(fetched)
    outcome = {}
    for sname in chosen:
        stage = STAGES[sname]
        params = stage_params(cfg, cfg_path, stage, name, root)
        stage_dir = root / "artifacts" / sname
        meta = artifacts.read_meta(stage_dir)
        uses = uses_now(meta) if meta else None
        key = None if uses is None else stage_key(stage, params, root, uses)
        if not force and key is not None and meta.get("pipeline", {}).get("key") == key:
            log(f"[{sname}] up to date (parameters, notebook, library modules, data and upstream unchanged): skipped")
            outcome[sname] = "skipped"
            continue
        (stage_dir / artifacts.META_NAME).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for stale in stage_dir.glob(f".{stage.notebook}.*.tmp*"):  # left by a killed run
            stale.unlink()
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
        if uses_now(meta) is None:
            raise RuntimeError(f"{stage.notebook} finished without recording what it used (StageRun.finish does)")
        parts = key_parts(stage, params, root, meta["uses"])  # the hashes as the stage saw them
        meta["pipeline"] = {"key": artifacts.digest(parts), "profile": name,
                            "config": artifacts.portable_path(cfg_path),
                            "notebook": stage.notebook, "notebook_sha256": parts["notebook"],
                            "upstream": parts["upstream"], "wall_time_s": round(wall, 1)}
        artifacts.write_json(stage_dir / artifacts.META_NAME, meta)
        log(f"[{sname}] done in {wall:.0f} s")
        outcome[sname] = "ran"
    return outcome
