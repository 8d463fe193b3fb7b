"""Start and stop expert servers: llama-cpp-python's OpenAI-compatible server, one process per expert.

Each server binds to 127.0.0.1 (loopback only: it has no authentication) on a free (or given) port and
runs one GGUF model with an optional GGUF LoRA adapter; its log goes to a private temporary folder.
``logits_all`` stays on (the server needs it to return ``logprobs``), so the server keeps an (n_ctx × vocab)
float32 score buffer: ``n_ctx`` is kept small (512: 0.5 GB for Gemma's 262k vocabulary).
Per token, llama-cpp-python's server log-softmaxes every cached row and sorts the whole vocabulary in
Python to find the top-n; that sort (≈0.1 s for SmolLM2's 49k tokens, ≈0.3 s for Gemma's 262k on one
busy core here) dominates its per-token time (benchmarks/bench_fusion.py).
Processes run in their own session and are terminated as a group by :meth:`ExpertServer.stop`, by the
pool's context manager, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx

from ..errors import InputError, ResourceUnavailable
from ..models import registry

HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LIVE: "set[ExpertServer]" = set()  # strong references: an unreferenced server must still be stopped at exit
_LOG_DIR: Path | None = None


def _private_log_dir() -> Path:
    """This process's folder for server logs, readable by this user only (``mkdtemp``): fixed log names
    straight in the shared temp folder could be pre-created by another user as symlinks to our files."""
    global _LOG_DIR
    if _LOG_DIR is None or not _LOG_DIR.is_dir():
        _LOG_DIR = Path(tempfile.mkdtemp(prefix="moe2-servers-"))
    return _LOG_DIR


def free_port(host: str = HOST) -> int:
    """A TCP port the OS reports free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    """One expert server: a registered model name or GGUF path, optional LoRA adapter (GGUF)."""

    name: str
    model: str
    adapter: str | None = None
    n_threads: int = 1
    n_ctx: int = 512
    seed: int = 0
    cpu: int | None = None        # pin the process to this core with taskset (None: no pinning)

    def model_path(self) -> Path:
        p = Path(self.model).expanduser()
        return p if p.suffix == ".gguf" and p.exists() else registry.locate(self.model, "llm")


class ExpertServer:
    """A running ``python -m llama_cpp.server`` process for one expert."""

    def __init__(self, spec: ServerSpec, port: int | None = None, host: str = HOST, log_dir=None):
        self.spec = spec
        self.host = host
        self.port = port or free_port(host)
        if host not in LOOPBACK:
            warnings.warn(f"expert server {spec.name} on {host}: llama.cpp's server has no authentication and "
                          "is reachable beyond this machine", stacklevel=2)
        self.log_dir = Path(log_dir) if log_dir else _private_log_dir()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.log_dir / f"moe2-server-{spec.name}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        s = self.spec
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(s.model_path()), "--host", self.host,
               "--port", str(self.port), "--n_threads", str(s.n_threads), "--n_threads_batch", str(s.n_threads),
               "--n_ctx", str(s.n_ctx), "--seed", str(s.seed), "--model_alias", s.name]
        if s.adapter:
            if not Path(s.adapter).exists():
                raise InputError(f"adapter {s.adapter} does not exist", param=f"{s.name}.adapter")
            cmd += ["--lora_path", str(s.adapter)]
        if s.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(s.cpu)] + cmd
        return cmd

    def start(self) -> "ExpertServer":
        if self.proc is not None:
            return self
        env = dict(os.environ, OMP_NUM_THREADS=str(self.spec.n_threads))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ExpertServer":
        """Poll ``/v1/models`` until the server answers; a process that exits early raises with its log."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise ResourceUnavailable(f"expert server {self.spec.name} exited before it was ready:\n{tail}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ResourceUnavailable(f"expert server {self.spec.name} not ready after {timeout:.0f} s "
                                  f"(log: {self.log_path})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Hard kill (SIGKILL) — what a crashed edge server looks like to the coordinator."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
        _LIVE.discard(self)

    def client(self, api: str = "openai"):
        """An :class:`~moe2lib.serve.coordinator.ExpertClient` for this server, told its vocabulary, end tokens and chat
        template (from the GGUF)."""
        from .chat import ChatTemplate
        from .coordinator import ExpertClient

        path = str(self.spec.model_path())
        n_vocab, end_ids = vocab_info(path)
        return ExpertClient(self.url, self.spec.name, api, vocab_size=n_vocab, end_ids=end_ids,
                            chat_template=ChatTemplate.from_gguf(path))

    def __repr__(self):
        return f"ExpertServer({self.spec.name!r}, {self.url}, alive={self.alive()})"


class ServerPool:
    """Several expert servers started together; a context manager that stops them all."""

    def __init__(self, specs: Sequence[ServerSpec], base_port: int | None = None, host: str = HOST, log_dir=None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InputError(f"duplicate expert names {names}", param="experts")
        self.servers = [ExpertServer(s, None if base_port is None else base_port + i, host, log_dir)
                        for i, s in enumerate(specs)]

    def start(self, timeout: float = 120.0) -> "ServerPool":
        try:
            for s in self.servers:
                s.start()
            for s in self.servers:
                s.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    @property
    def urls(self) -> dict[str, str]:
        return {s.spec.name: s.url for s in self.servers}

    def clients(self, names: Sequence[str] | None = None) -> list:
        """Clients of the named servers (default: all, in start order)."""
        return [self[n].client() for n in (names or [s.spec.name for s in self.servers])]

    def __getitem__(self, name: str) -> ExpertServer:
        return next(s for s in self.servers if s.spec.name == name)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def specs_from_registry(path, **options) -> list[ServerSpec]:
    """Server specs of the llama.cpp experts in ``experts.json`` (adapters resolved by read_registry)."""
    from ..models.experts import read_registry

    return [ServerSpec(e.name, e.model, e.adapter, **options) for e in read_registry(path)
            if e.backend == "llama_cpp"]


def specs_from_models(names: Sequence[str], **options) -> list[ServerSpec]:
    """Server specs of base models (registered names or GGUF paths); repeated models get a numbered name."""
    out, count = [], {}
    for m in names:
        label = registry.display_name(m)
        count[label] = count.get(label, 0) + 1
        out.append(ServerSpec(label if count[label] == 1 else f"{label}-{count[label]}", m, **options))
    return out


def default_specs(experts_json=None, model_names: Sequence[str] | None = None, **options) -> list[ServerSpec]:
    """experts.json when it exists, else the given (or the two packaged) base models."""
    if model_names:
        return specs_from_models(model_names, **options)
    if experts_json is not None and Path(experts_json).exists():
        return specs_from_registry(experts_json, **options)
    return specs_from_models(["smollm2-135m-instruct", "gemma3-270m"], **options)


@functools.lru_cache(maxsize=None)
def vocab_info(model_path: str) -> tuple[int, tuple[int, ...]]:
    """(vocabulary size, end-of-generation token ids) of a GGUF model, from a vocabulary-only load."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    try:
        vocab = llm._model.vocab
        n = llm.n_vocab()
        return n, tuple(i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i))
    finally:
        llm.close()


@atexit.register
def _stop_all():
    for s in list(_LIVE):
        s.stop()
