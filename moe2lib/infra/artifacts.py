"""Atomic artifact files and their provenance (meta.json).

Every file a stage writes goes through a temporary file in the same folder and ``os.replace``,
so a crash leaves either the old file or the new one, never half of one. A stage is complete
only when its ``meta.json`` exists; it records parameters, seed, versions, git commit, the
inputs' hashes and the wall time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
META_NAME = "meta.json"
TRACKED_PACKAGES = (
    "moe2lib", "numpy", "torch", "transformers", "peft", "sentence-transformers",
    "scikit-learn", "llama_cpp_python", "gguf", "papermill",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temporaries are 0600


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"


def write_json(path, obj) -> Path:
    return write_text(path, to_json(obj))


def read_json(path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None


def write_npz(path, **arrays) -> Path:
    """Write arrays as an uncompressed .npz; object arrays are refused so loading never needs pickle."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise InputError("object arrays cannot be stored without pickle", path=path, param=key)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def read_npz(path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"unreadable .npz file ({exc})", path=path) from None


def portable_path(path) -> str | None:
    """A path as recorded in an artifact: relative to the repository when inside it, ``../shared/...`` when
    in the data folder beside it, so results do not carry the machine's folder layout; else absolute."""
    if path is None:
        return None
    p = Path(path).resolve()
    for base, prefix in ((REPO_ROOT, None), (REPO_ROOT.parent / "shared", Path("..", "shared"))):
        try:
            rel = p.relative_to(base.resolve())
        except ValueError:
            continue
        return str(rel if prefix is None else prefix / rel)
    return str(p)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj) -> str:
    """Stable sha256 of a JSON-able object (parameters, lists of hashes)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


OUTPUTS = ("artifacts", "figures")   # what the pipeline itself writes into the checkout


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files other than the pipeline's outputs
    (``artifacts/``, ``figures/``, rewritten by the run itself) differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){d}" for d in OUTPUTS)], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def provenance() -> dict[str, Any]:
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "machine": machine_info(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def input_hashes(paths) -> dict[str, str]:
    """sha256 of each input file, keyed by its :func:`portable_path`."""
    return {portable_path(p): file_sha256(p) for p in paths}


def write_meta(stage_dir, *, params: Mapping[str, Any], inputs=(), wall_time_s: float | None = None,
               seed: int | None = None, **extra) -> dict:
    """Write ``meta.json`` last, marking the stage folder complete."""
    meta = {
        "stage": Path(stage_dir).name,
        "params": dict(params),
        "seed": seed if seed is not None else params.get("seed"),
        "inputs": input_hashes(inputs) if not isinstance(inputs, Mapping) else dict(inputs),
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 3),
        **provenance(),
        **extra,
    }
    write_json(Path(stage_dir) / META_NAME, meta)
    return meta


def read_meta(stage_dir) -> dict | None:
    path = Path(stage_dir) / META_NAME
    return read_json(path) if path.exists() else None
