"""The profiles: ``configs/<profile>.yaml``, read and checked, and the benchmark they name.

:func:`load_config` reads a profile (YAML syntax, repeated keys, unknown keys, the shared keys' types; every
error names the file, the line and the key); :mod:`moe2lib.pipeline.runner` passes its values to the stages'
notebooks. A stage notebook opened by hand, whose ``benchmark`` parameter is None, takes its profile's
(:func:`profile_benchmark`), importing this module only then: a stage run by the pipeline does not, so
editing how profiles are read reruns no stage.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..infra import artifacts
from .stages import STAGES

CONFIGS = artifacts.REPO_ROOT / "configs"
PROFILES = ("smoke", "default", "paper")
SHARED_KEYS = {"seed": int, "data_dir": (str, type(None)), "n_threads": int, "n_questions": int, "benchmark": dict}


def yaml_line(path, *keys) -> int | None:
    """1-based line of a key (str) or list item (int) in a YAML file, read from the composed nodes' marks.

    Errors point at the line to edit; the deepest key found is used, None when the file cannot be read.
    """
    import yaml

    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not found:
                break
            k, node = found[-1]  # safe_load keeps the last of repeated keys
            line = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _repeated_key(node, where: str = "") -> tuple[str, int] | None:
    """(dotted key, line) of the first key given twice in one mapping: YAML would silently keep the last."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            name = f"{where}.{k.value}" if where else str(k.value)
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    return name, k.start_mark.line + 1
                seen.add(k.value)
            if found := _repeated_key(v, name):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            if found := _repeated_key(v, f"{where}[{i}]"):
                return found
    return None


def load_config(profile_or_path: str) -> tuple[dict, Path]:
    """A profile's settings, checked: YAML syntax, repeated keys, unknown keys, the shared keys' types.

    Every error names the file, the line and the key; the stages' own entries are checked against
    their notebooks by :func:`stage_params`.
    """
    import yaml

    path = Path(profile_or_path)
    if not path.suffix:
        path = CONFIGS / f"{profile_or_path}.yaml"
    if not path.exists():
        raise InputError(f"no such profile; known: {', '.join(PROFILES)}", path=path, param="profile")
    try:
        text = path.read_text(encoding="utf-8")
        cfg = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 ({exc.reason})", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"invalid YAML ({getattr(exc, 'problem', exc)})", path=path,
                         line=None if mark is None else mark.line + 1) from None
    if not isinstance(cfg, dict):
        raise InputError("a profile is a mapping of parameters", path=path)
    repeated = _repeated_key(yaml.compose(text, Loader=yaml.SafeLoader))
    if repeated:
        raise InputError("key given twice (YAML would silently keep only the last)", path=path,
                         line=repeated[1], param=repeated[0])
    for key, value in cfg.items():
        if key in SHARED_KEYS:
            if not isinstance(value, SHARED_KEYS[key]) or isinstance(value, bool):
                raise InputError(f"{key} has the wrong type {type(value).__name__}", path=path,
                                 line=yaml_line(path, key), param=key)
        elif key in STAGES:
            if not isinstance(value, dict):
                raise InputError("a stage's entry is a mapping of its notebook's parameters", path=path,
                                 line=yaml_line(path, key), param=key)
        elif key == "profile":
            if not isinstance(value, str):
                raise InputError(f"profile has the wrong type {type(value).__name__}", path=path,
                                 line=yaml_line(path, key), param=key)
        else:
            raise InputError(f"unknown key; allowed: profile, {', '.join(SHARED_KEYS)}, "
                             f"and the stages {', '.join(STAGES)}", path=path, line=yaml_line(path, key),
                             param=str(key))
    return cfg, path


def profile_benchmark(profile: str) -> dict:
    """The ``benchmark`` entry of a profile (a name in configs/ or a YAML path): the settings of
    :func:`moe2lib.data.tasks.build_benchmark` every stage builds its questions from; the default profile's
    where the profile has none."""
    cfg, _ = load_config(profile)
    return cfg["benchmark"] if "benchmark" in cfg else load_config("default")[0]["benchmark"]
