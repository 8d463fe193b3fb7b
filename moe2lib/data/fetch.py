"""Fetch the benchmark files from their upstream addresses into a data folder, checked against a manifest.

The manifest (``manifest.json`` beside this module) gives, per file under the data folder, its sha256 and
size and the address it comes from: the llm-foundry files at the pinned commit, and MMLU's CSV files, which
come inside Hendrycks et al.'s ``data.tar`` (its ``data/`` folder becomes ``mmlu/``; the archive itself has no
checksum here, each CSV it holds does). :func:`fetch` lays the files out as the data folder that
:func:`~moe2lib.data.loaders.resolve_data_dir` reads, so ``MOE2_DATA_DIR`` can point at it.

Every file is written under a temporary name and renamed into place once its checksum is right: a download
goes to ``<file>.part`` (MMLU's archive to ``<dir>/.moe2-fetch/data.tar.part``) and an interrupted one is
resumed with an HTTP Range request, in the same run (a few tries) or the next. A file whose checksum differs
is refused by name and nothing is left under its name. ``mirror`` (or ``$MOE2_DATA_MIRROR``) fetches
``<mirror>/<host>/<path>`` instead of ``https://<host>/<path>``; a mirror may also be a local folder.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import InputError, ResourceUnavailable
from .loaders import HOW_TO_GET_MMLU
from .tasks import TASKS

MANIFEST = Path(__file__).with_name("manifest.json")
FOUNDRY_REPO = "mosaicml/llm-foundry"
FOUNDRY_COMMIT = "8c8dd48f72168c5d51e2f7b151595892a8fba43d"
MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
MMLU_SPLITS = ("test", "val", "dev", "auxiliary_train")
MIRROR_ENV = "MOE2_DATA_MIRROR"
WORK_DIR = ".moe2-fetch"  # under the data folder: MMLU's archive while it is fetched and unpacked
RECIPE = ("docs/data.md has the commands (curl, tar) that build the folder by hand; "
          "or pass --mirror URL (a mirror laid out as URL/<host>/<path>)")
_CHUNK = 1 << 16


# --- the manifest ----------------------------------------------------------------------------------------

def upstream_url(task: str) -> str:
    """The address of a task's file: for llm-foundry tasks the raw file at the pinned commit; MMLU's archive."""
    spec = TASKS[task]
    if spec.fmt == "mmlu":
        return MMLU_URL
    where, path = spec.upstream.split(" ", 1)
    repo, short = where.split("@")
    if repo != FOUNDRY_REPO or not FOUNDRY_COMMIT.startswith(short):
        raise InputError(f"task {task!r}: upstream {spec.upstream!r} is not {FOUNDRY_REPO} at {FOUNDRY_COMMIT}")
    return f"https://raw.githubusercontent.com/{FOUNDRY_REPO}/{FOUNDRY_COMMIT}/{path}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"sha256": _sha256(path), "size": path.stat().st_size}


def build_manifest(folder) -> dict:
    """The manifest of a complete data folder: every task's file and MMLU's CSV files (all four splits),
    with sha256 and size. How ``manifest.json`` was made (from the development copy of the data)."""
    folder = Path(folder)
    mmlu = {f"mmlu/{split}/{p.name}": _entry(p)
            for split in MMLU_SPLITS for p in sorted((folder / "mmlu" / split).glob("*.csv"))}
    files = {}
    for name, spec in TASKS.items():
        if spec.fmt != "mmlu":
            files[spec.path] = {"url": upstream_url(name), **_entry(folder / spec.path)}
    return {"about": "sha256 and size of every file `python -m moe2lib data fetch` writes, by path under the "
                     "data folder; MMLU's CSV files come inside the archive at mmlu.url, whose data/ folder "
                     "is the data folder's mmlu/ (built by moe2lib.data.fetch.build_manifest from the "
                     "development copy of the data)",
            "mmlu": {"url": MMLU_URL, "member_prefix": "data/", "into": "mmlu/", "files": mmlu},
            "files": dict(sorted(files.items()))}


def load_manifest(path=None) -> dict:
    path = Path(path) if path else MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the data manifest ({exc})", path=path) from None
    if not {"mmlu", "files"} <= set(manifest):
        raise InputError("not a data manifest (needs mmlu, files)", path=path)
    return manifest


# --- addresses --------------------------------------------------------------------------------------------

def mirror_url(url: str, mirror: str | None) -> str:
    """``url`` as fetched: itself without a mirror, else ``<mirror>/<host>/<path>`` (a mirror without a
    scheme is a local folder)."""
    if not mirror:
        return url
    if "://" not in mirror:
        mirror = Path(mirror).expanduser().resolve().as_uri()
    parts = urllib.parse.urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


def recipe(upstream: str, target: str) -> str:
    """How to get one file by hand: its upstream address (not a mirror's) and where it goes."""
    if upstream == MMLU_URL:
        return HOW_TO_GET_MMLU + " Or: " + RECIPE
    return f"By hand: curl -fL {upstream} -o <dir>/{target}; for every file, {RECIPE}"


# --- one download ----------------------------------------------------------------------------------------

def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header; None where absent or '*'."""
    try:
        _, rest = value.split(" ", 1)
        span, total = rest.split("/")
        return int(span.split("-")[0]), (None if total == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def download(url: str, part: Path, *, size: int | None = None, desc: str = "", how: str = "",
             retries: int = 3, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch ``url`` into ``part``, resuming from what ``part`` already holds (HTTP Range), and return it.

    A transfer cut short is resumed up to ``retries`` times in all; a server that ignores the Range header
    sends the whole file, which replaces the part. ``size`` (when known) says when the part is complete.
    An address that cannot be reached raises ResourceUnavailable naming it and the manual recipe at once;
    so do transfers cut short ``retries`` times, and the part is kept for the next run to resume. ``how``
    (the manual recipe, :func:`recipe`) ends those messages.
    """
    from tqdm.auto import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(max(1, retries)):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have >= size:
            if have == size:
                return part
            part.unlink()
            have = 0
        headers = {"User-Agent": "moe2lib-fetch", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                if _content_range(exc.headers.get("Content-Range", "").replace("*", "0-0"))[1] == have:
                    return part  # complete already (the run that fetched it stopped before renaming it)
                part.unlink()  # longer than the file: start again
                last = exc
                continue
            raise ResourceUnavailable(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}. "
                                      f"{how}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise ResourceUnavailable(f"cannot reach {url} ({reason}): no network, or the address is wrong. "
                                      f"{how}") from None
        with resp:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if have and resp.status == 206 and start == have:
                mode = "ab"
            else:  # a whole file (the server ignored the range) or a range we did not ask for
                have, mode, total = 0, "wb", None
            length = resp.headers.get("Content-Length")
            if total is None and length is not None and length.isdigit():
                total = have + int(length)
            expect = size if size is not None else total
            try:
                with open(part, mode) as fh, tqdm(total=expect, initial=have, unit="B", unit_scale=True,
                                                  unit_divisor=1024, desc=desc or part.name, file=sys.stderr,
                                                  disable=not progress, leave=True) as bar:
                    while block := resp.read(_CHUNK):
                        fh.write(block)
                        bar.update(len(block))
                    fh.flush()
                    os.fsync(fh.fileno())
            except (http.client.HTTPException, OSError) as exc:  # cut short: resume
                last = exc
                continue
        got = part.stat().st_size
        if total is not None and got < total:
            last = ConnectionError(f"connection closed after {got} of {total} bytes")
            continue
        return part
    got = part.stat().st_size if part.exists() else 0
    raise ResourceUnavailable(f"fetching {url} was cut short {max(1, retries)} times ({last}); {part} keeps the "
                              f"{got} bytes received: run the fetch again to resume. {how}")


# --- the data folder ---------------------------------------------------------------------------------------

@dataclass
class Refused:
    """A file whose checksum differs from the manifest's: not written."""

    path: str
    url: str
    why: str

    def __str__(self) -> str:
        return f"{self.path} (from {self.url}): {self.why}"


def _matches(path: Path, entry: Mapping) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]


def _differs(sha: str, size: int, entry: Mapping) -> str | None:
    if sha == entry["sha256"] and size == entry["size"]:
        return None
    return f"sha256 {sha} ({size} bytes), the manifest says {entry['sha256']} ({entry['size']} bytes)"


def files_for(tasks: Iterable[str], manifest: Mapping | None = None) -> dict[str, dict]:
    """Per path under the data folder, the manifest entry of each file ``tasks`` need (MMLU: its CSVs)."""
    manifest = manifest or load_manifest()
    out = {}
    for task in tasks:
        spec = TASKS.get(task)
        if spec is None:
            raise InputError(f"unknown task {task!r}; known: {', '.join(TASKS)}", param="tasks")
        if spec.fmt == "mmlu":
            out.update(manifest["mmlu"]["files"])
        elif spec.path not in manifest["files"]:
            raise InputError(f"task {task!r}: {spec.path} is not in the data manifest", path=MANIFEST)
        else:
            out[spec.path] = manifest["files"][spec.path]
    return out


def _fetch_file(root: Path, rel: str, entry: Mapping, mirror, log, **kw) -> tuple[str, Refused | None]:
    final = root / rel
    if _matches(final, entry):
        return "present", None
    if final.exists():
        log(f"{rel}: differs from the manifest, fetching it again")
    url = mirror_url(entry["url"], mirror)
    part = final.with_name(final.name + ".part")
    download(url, part, size=entry["size"], desc=rel, how=recipe(entry["url"], rel), **kw)
    why = _differs(_sha256(part), part.stat().st_size, entry)
    if why:
        part.unlink()
        return "refused", Refused(rel, url, why)
    os.replace(part, final)
    return "fetched", None


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _fetch_mmlu(root: Path, spec: Mapping, mirror, log, **kw) -> tuple[dict[str, str], list[Refused]]:
    """MMLU's CSV files out of its archive: each checked, then renamed into place; other members ignored."""
    wanted = spec["files"]
    status = {rel: "present" for rel, entry in wanted.items() if _matches(root / rel, entry)}
    missing = [rel for rel in wanted if rel not in status]
    if not missing:
        return status, []
    url = mirror_url(spec["url"], mirror)
    work = root / WORK_DIR
    archive = work / "data.tar"
    if not archive.is_file():  # a complete archive left by an interrupted unpack is used again
        download(url, work / "data.tar.part", desc="mmlu (data.tar)", how=recipe(spec["url"], "mmlu/"), **kw)
        os.replace(work / "data.tar.part", archive)
    unpacked = work / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    prefix, into = spec["member_prefix"], spec["into"]
    checked: dict[str, str | None] = {}
    ignored = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _member_name(member.name)
                rel = into + name[len(prefix):] if name.startswith(prefix) else None
                if not member.isfile():
                    continue
                if rel not in wanted:
                    ignored += 1
                if rel not in missing or rel in checked:
                    continue
                src = tar.extractfile(member)
                out = unpacked / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                with src, open(out, "wb") as fh:
                    while block := src.read(_CHUNK):
                        h.update(block)
                        size += len(block)
                        fh.write(block)
                checked[rel] = _differs(h.hexdigest(), size, wanted[rel])
    except (tarfile.TarError, EOFError, OSError) as exc:
        archive.unlink(missing_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)
        raise InputError(f"{url} is not a readable tar archive ({exc}); nothing of it was written",
                         path=url) from None
    refused = [Refused(rel, f"{url} member {prefix}{rel[len(into):]}", why)
               for rel, why in checked.items() if why]
    refused += [Refused(rel, url, f"the archive has no {prefix}{rel[len(into):]}")
                for rel in missing if rel not in checked]
    for rel, why in checked.items():
        if why is None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(unpacked / rel, root / rel)
            status[rel] = "fetched"
    for r in refused:
        status[r.path] = "refused"
    if ignored:
        log(f"mmlu: {ignored} files of data.tar are not in the manifest, left out")
    archive.unlink()  # a bad archive is not kept: the next run fetches it again
    shutil.rmtree(unpacked, ignore_errors=True)
    return status, refused


def fetch(tasks: Iterable[str], to="data", *, mirror: str | None = None, manifest: Mapping | None = None,
          log=print, progress: bool = True, retries: int = 3, timeout: float = 60.0) -> dict[str, str]:
    """Fetch the files ``tasks`` need into the data folder ``to``; per path under it, "fetched" or "present".

    Files already there with the manifest's checksum are kept. ``mirror`` defaults to ``$MOE2_DATA_MIRROR``.
    Raises InputError naming every file whose checksum differs (none of them is written; the others are)
    and ResourceUnavailable, naming the address and the manual recipe, when one cannot be fetched.
    """
    tasks = list(dict.fromkeys(tasks))
    manifest = manifest or load_manifest()
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    root = Path(to).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_into(root, tasks, manifest, mirror, log, dict(retries=retries, timeout=timeout,
                                                                    progress=progress))
    finally:  # a folder left empty by a failed transfer would pass for a data folder of that task
        for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
            if Path(folder) != root and not any(Path(folder).iterdir()):
                Path(folder).rmdir()


def _fetch_into(root: Path, tasks: list, manifest: Mapping, mirror, log, kw: dict) -> dict[str, str]:
    status: dict[str, str] = {}
    refused: list[Refused] = []
    for rel, entry in files_for([t for t in tasks if TASKS.get(t) is None or TASKS[t].fmt != "mmlu"],
                                manifest).items():
        status[rel], bad = _fetch_file(root, rel, entry, mirror, log, **kw)
        refused += [bad] if bad else []
    if any(TASKS[t].fmt == "mmlu" for t in tasks):
        got, bad = _fetch_mmlu(root, manifest["mmlu"], mirror, log, **kw)
        status.update(got)
        refused += bad
    work = root / WORK_DIR
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    fetched = sum(v == "fetched" for v in status.values())
    log(f"{fetched} files fetched, {sum(v == 'present' for v in status.values())} already in place, "
        f"{len(refused)} refused, in {root.resolve()}")
    if refused:
        raise InputError(f"refused, not written (checksum differs from the manifest, or not in the archive): "
                         f"{'; '.join(map(str, refused))}")
    return status
