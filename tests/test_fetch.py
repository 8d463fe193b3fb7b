"""`python -m moe2lib data fetch` against a real local HTTP server serving a mirror laid out as
``<mirror>/<host>/<path>`` of the upstream addresses, built from the development copy of the data."""

import functools
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import tomllib
import urllib.parse
from pathlib import Path

import pytest

from moe2lib.data import fetch, loaders, tasks
from moe2lib.errors import InputError, ResourceUnavailable
from moe2lib.pipeline import cli, runner

from conftest import needs_data

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["mmlu", "arc_easy", "winogrande", "boolq"]
BOOLQ = "llm-foundry/reading_comprehension/boolq.jsonl"
TAR_PATH = "/people.eecs.berkeley.edu/~hendrycks/data.tar"


def _shared() -> Path:
    return loaders.resolve_data_dir(None, "llm-foundry")


def _url_path(url: str) -> str:
    """The path part of an upstream address as the mirror serves it: /<host>/<path>."""
    parts = urllib.parse.urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


def _mmlu_tar(src: Path, change: str | None = None) -> bytes:
    """data.tar as Hendrycks et al. lay it out (data/<split>/*.csv) from a data folder's mmlu/; ``change``:
    one CSV (path under the data folder) with a byte altered."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in sorted(fetch.load_manifest()["mmlu"]["files"]):
            data = (src / rel).read_bytes()
            if rel == change:
                data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
            info = tarfile.TarInfo("data/" + rel.removeprefix("mmlu/"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("data/LICENSE")  # a member the manifest does not name: left out
        info.size = 3
        tar.addfile(info, io.BytesIO(b"MIT"))
    return buf.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A mirror of the smoke profile's files: MMLU's data.tar and the llm-foundry files at the pinned commit."""
    src = _shared()
    root = tmp_path_factory.mktemp("mirror")
    tar = root / TAR_PATH.lstrip("/")
    tar.parent.mkdir(parents=True)
    tar.write_bytes(_mmlu_tar(src))
    for rel, entry in fetch.files_for(SMOKE[1:]).items():
        out = root / _url_path(entry["url"]).lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((src / rel).read_bytes())
    return root


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror with Range requests (206), and can alter a file's bytes or cut a transfer short."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        srv.requests.append((path, rng))
        local = Path(self.translate_path(self.path))
        if path in srv.swap:
            data = srv.swap[path]
        elif local.is_file():
            data = local.read_bytes()
        else:
            self.send_error(404)
            return
        start = 0
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut.pop(path, None)  # once
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(mirror):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(mirror)))
    srv.daemon_threads = True
    srv.requests, srv.swap, srv.cut, srv.ranges = [], {}, {}, True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MOE2_DATA_DIR", raising=False)
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)


def _expected(task_names) -> dict[str, dict]:
    return fetch.files_for(task_names)


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _assert_equal_to_shared(folder: Path, task_names):
    src = _shared()
    expected = _expected(task_names)
    assert _files_under(folder) == set(expected)  # the layout exactly: no .part, no work folder, nothing else
    for rel in expected:
        assert (folder / rel).read_bytes() == (src / rel).read_bytes(), rel


# --- the manifest and the addresses -------------------------------------------------------------------------

@needs_data
def test_manifest_is_the_development_copy():
    """The committed manifest is what build_manifest makes of the data folder (whose SHA256SUMS it agrees with)."""
    assert fetch.build_manifest(_shared()) == fetch.load_manifest()


def test_manifest_covers_every_task_at_its_upstream_address():
    manifest = fetch.load_manifest()
    assert manifest["mmlu"]["url"] == "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
    assert len(manifest["mmlu"]["files"]) == 177  # 57 subjects x test, val, dev + 6 auxiliary_train files
    for split in ("test", "val", "dev"):
        assert sum(p.startswith(f"mmlu/{split}/") for p in manifest["mmlu"]["files"]) == 57
    base = ("https://raw.githubusercontent.com/mosaicml/llm-foundry/8c8dd48f72168c5d51e2f7b151595892a8fba43d/"
            "scripts/eval/local_data/")
    for name, spec in tasks.TASKS.items():
        files = fetch.files_for([name])
        assert files, name
        if spec.fmt != "mmlu":
            (entry,) = files.values()
            assert entry["url"] == fetch.upstream_url(name) == base + spec.upstream.split("local_data/")[1]
            assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and entry["size"] > 0
    readme = (ROOT / "docs" / "data.md").read_text()
    assert fetch.FOUNDRY_COMMIT in readme and fetch.MMLU_URL in readme
    assert "data fetch" in readme and "<host>/<path>" in readme
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "manifest.json" in pyproject["tool"]["setuptools"]["package-data"]["moe2lib.data"]


def test_mirror_url_is_mirror_host_path(tmp_path):
    url = "https://raw.githubusercontent.com/mosaicml/llm-foundry/abc/scripts/x.jsonl"
    assert fetch.mirror_url(url, None) == url
    assert fetch.mirror_url(url, "http://m.example/pub/") == "http://m.example/pub/raw.githubusercontent.com/mosaicml/llm-foundry/abc/scripts/x.jsonl"
    assert fetch.mirror_url(fetch.MMLU_URL, "http://m") == "http://m/people.eecs.berkeley.edu/~hendrycks/data.tar"
    assert fetch.mirror_url(url, str(tmp_path)) == tmp_path.as_uri() + "/raw.githubusercontent.com/mosaicml/llm-foundry/abc/scripts/x.jsonl"


def test_profile_tasks():
    assert runner.profile_tasks(runner.load_config("smoke")[0]) == SMOKE
    assert len(runner.profile_tasks(runner.load_config("paper")[0])) == 23
    assert runner.profile_tasks({"benchmark": {"tasks": ["boolq"]}}) == ["mmlu", "boolq"]


# --- fetching from the mirror --------------------------------------------------------------------------------

@needs_data
def test_fetch_smoke_profile_from_a_fresh_folder(server, tmp_path, no_env, monkeypatch):
    """The command line, from a folder with no data folder: ./data holds exactly the smoke files, equal."""
    work = tmp_path / "clone"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MOE2_DATA_DIR", fetch.MIRROR_ENV)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "moe2lib", "data", "fetch", "--profile", "smoke",
                          "--mirror", server.url], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _assert_equal_to_shared(work / "data", SMOKE)
    assert f"MOE2_DATA_DIR={work / 'data'}" in out.stdout and "180 files fetched" in out.stdout
    assert "data.tar" in out.stderr and "100%" in out.stderr  # a progress bar per file
    assert {p for p, _ in server.requests} == {TAR_PATH} | {_url_path(e["url"]) for e in _expected(SMOKE[1:]).values()}

    # MOE2_DATA_DIR can point at the result
    monkeypatch.setenv("MOE2_DATA_DIR", str(work / "data"))
    assert loaders.resolve_data_dir(None, "mmlu/test") == work / "data"
    assert len(loaders.load_mmlu("test")) == 14042 and len(tasks.read_task("boolq")) == 3270
    monkeypatch.delenv("MOE2_DATA_DIR")

    # again: everything in place, nothing asked of the server
    before = len(server.requests)
    status = fetch.fetch(SMOKE, work / "data", mirror=server.url, log=lambda s: None, progress=False)
    assert set(status.values()) == {"present"} and len(server.requests) == before


@needs_data
def test_to_folder_and_mirror_from_the_environment(server, tmp_path, no_env, monkeypatch):
    monkeypatch.setenv(fetch.MIRROR_ENV, server.url)
    assert cli.main(["data", "fetch", "--profile", "smoke", "--to", str(tmp_path / "d")]) == 0
    _assert_equal_to_shared(tmp_path / "d", SMOKE)
    assert loaders.resolve_data_dir(tmp_path / "d", "llm-foundry") == tmp_path / "d"


@needs_data
def test_a_local_folder_is_a_mirror_too(mirror, tmp_path, no_env):
    fetch.fetch(["mmlu", "boolq"], tmp_path / "d", mirror=str(mirror), log=lambda s: None, progress=False)
    _assert_equal_to_shared(tmp_path / "d", ["mmlu", "boolq"])


@needs_data
def test_a_file_whose_checksum_differs_is_refused_by_name(server, mirror, tmp_path, no_env):
    path = _url_path(fetch.files_for(["boolq"])[BOOLQ]["url"])
    good = (mirror / path.lstrip("/")).read_bytes()
    server.swap[path] = good[:100] + b"X" + good[101:]
    to = tmp_path / "d"
    with pytest.raises(InputError) as err:
        fetch.fetch(["winogrande", "boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    assert BOOLQ in str(err.value) and "sha256" in str(err.value)
    assert not (to / BOOLQ).exists() and not list(to.rglob("*.part"))  # nothing under its name, no part left
    assert (to / "llm-foundry/language_understanding/winogrande.jsonl").is_file()  # the good one is in place

    bad_csv = "mmlu/test/anatomy_test.csv"
    server.swap[TAR_PATH] = _mmlu_tar(_shared(), change=bad_csv)
    with pytest.raises(InputError) as err:
        fetch.fetch(["mmlu"], to, mirror=server.url, log=lambda s: None, progress=False)
    assert bad_csv in str(err.value) and "data/test/anatomy_test.csv" in str(err.value)
    assert not (to / bad_csv).exists() and (to / "mmlu/test/abstract_algebra_test.csv").is_file()
    assert not (to / fetch.WORK_DIR).exists()

    # with the mirror mended, the next run fetches just the refused files
    server.swap.clear()
    server.requests.clear()
    status = fetch.fetch(["mmlu", "winogrande", "boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    assert {k for k, v in status.items() if v == "fetched"} == {BOOLQ, bad_csv}
    _assert_equal_to_shared(to, ["mmlu", "winogrande", "boolq"])


@needs_data
def test_an_interrupted_transfer_is_resumed_with_a_range_request(server, tmp_path, no_env):
    path = _url_path(fetch.files_for(["boolq"])[BOOLQ]["url"])
    server.cut = {path: 100_000, TAR_PATH: 3_000_000}
    fetch.fetch(["mmlu", "boolq"], tmp_path / "d", mirror=server.url, log=lambda s: None, progress=False)
    assert (path, "bytes=100000-") in server.requests and (TAR_PATH, "bytes=3000000-") in server.requests
    _assert_equal_to_shared(tmp_path / "d", ["mmlu", "boolq"])


@needs_data
def test_an_interrupted_fetch_resumes_on_the_next_run(server, tmp_path, no_env):
    path = _url_path(fetch.files_for(["boolq"])[BOOLQ]["url"])
    server.cut = {path: 50_000}
    to = tmp_path / "d"
    with pytest.raises(ResourceUnavailable, match="run the fetch again to resume"):
        fetch.fetch(["boolq"], to, mirror=server.url, log=lambda s: None, progress=False, retries=1)
    assert not (to / BOOLQ).exists() and (to / (BOOLQ + ".part")).stat().st_size == 50_000
    fetch.fetch(["boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    assert server.requests[-1] == (path, "bytes=50000-")
    _assert_equal_to_shared(to, ["boolq"])


@needs_data
def test_a_server_without_ranges_sends_the_whole_file_again(server, tmp_path, no_env):
    server.ranges = False
    to = tmp_path / "d"
    (to / BOOLQ).parent.mkdir(parents=True)
    (to / (BOOLQ + ".part")).write_bytes(b"stale bytes from another file")
    fetch.fetch(["boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    _assert_equal_to_shared(to, ["boolq"])


@needs_data
def test_a_part_that_is_not_a_prefix_is_refused_then_fetched_whole(server, tmp_path, no_env):
    to = tmp_path / "d"
    (to / BOOLQ).parent.mkdir(parents=True)
    (to / (BOOLQ + ".part")).write_bytes(b"x" * 1000)
    with pytest.raises(InputError, match=re.escape(BOOLQ)):
        fetch.fetch(["boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    assert not list(to.rglob("*.part")) and not (to / BOOLQ).exists()
    fetch.fetch(["boolq"], to, mirror=server.url, log=lambda s: None, progress=False)
    _assert_equal_to_shared(to, ["boolq"])


def test_no_server_names_the_address_and_the_manual_recipe(tmp_path, no_env, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}"
    with pytest.raises(ResourceUnavailable) as err:
        fetch.fetch(["boolq"], tmp_path / "d", mirror=mirror, log=lambda s: None, progress=False)
    url = fetch.mirror_url(fetch.upstream_url("boolq"), mirror)
    assert url in str(err.value) and "docs/data.md" in str(err.value)
    assert f"curl -fL {fetch.upstream_url('boolq')} -o <dir>/{BOOLQ}" in str(err.value)
    with pytest.raises(ResourceUnavailable) as err:
        fetch.fetch(["mmlu"], tmp_path / "d", mirror=mirror, log=lambda s: None, progress=False)
    assert f"{mirror}{TAR_PATH}" in str(err.value) and loaders.HOW_TO_GET_MMLU in str(err.value)
    assert cli.main(["data", "fetch", "--profile", "smoke", "--to", str(tmp_path / "d"), "--mirror", mirror]) == 2
    message = capsys.readouterr().err
    assert f"{mirror}/" in message and "docs/data.md" in message
    assert not (tmp_path / "d" / BOOLQ).exists()


# --- reproduce without a data folder -----------------------------------------------------------------------

@needs_data
def test_reproduce_fetches_into_dot_data_when_no_folder_is_found(server, tmp_path, no_env, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(loaders, "_REPO", tmp_path / "repo")  # no data beside the repository either
    monkeypatch.setenv(fetch.MIRROR_ENV, server.url)
    cfg, _ = runner.load_config("smoke")
    logs = []
    assert runner.ensure_data(cfg, logs.append) == work / "data"
    assert "no data folder" in logs[0] and f"into {work / 'data'}" in logs[0]
    _assert_equal_to_shared(work / "data", SMOKE)
    assert runner.ensure_data(cfg, logs.append) is None  # found now

    def called(cfg, log):
        raise RuntimeError("ensure_data called")

    monkeypatch.setattr(runner, "ensure_data", called)
    with pytest.raises(RuntimeError, match="ensure_data called"):
        runner.reproduce("smoke", out=tmp_path / "run", log=logs.append)


def test_an_explicit_data_folder_is_not_filled(tmp_path, no_env, monkeypatch):
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path))
    assert runner.ensure_data(runner.load_config("smoke")[0], print) is None
    assert runner.ensure_data({"data_dir": str(tmp_path)}, print) is None
    assert not list(tmp_path.iterdir())
