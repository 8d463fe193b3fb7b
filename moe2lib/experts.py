"""Experts: language models that give, for each prompt, a distribution over the answer letters.

Backends plug into ``BACKENDS`` (name -> class). Both shipped backends tokenise a prompt the same
way — the text without special tokens, then the BOS token prepended when the GGUF says so
(``tokenizer.ggml.add_bos_token``) — because a BOS on one side only moves the logits by more than 1.
Only the last position's logits are computed and read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifacts, models
from .data import LETTERS
from .errors import InputError, ResourceUnavailable


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@lru_cache(maxsize=None)
def gguf_metadata(path: str) -> dict[str, str]:
    """The GGUF header's scalar and string fields, as strings, read by llama.cpp without the weights.

    (The gguf package's Python reader takes ~20-50 s for Gemma's 262k-token vocabulary; llama.cpp's
    vocabulary-only load takes well under a second.)
    """
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs a context warning even when not verbose
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def gguf_add_bos(path) -> bool:
    """Whether the model's tokenizer prepends BOS (``tokenizer.ggml.add_bos_token``)."""
    return gguf_metadata(str(path)).get("tokenizer.ggml.add_bos_token", "false").lower() == "true"


class Expert:
    """An expert answering multiple-choice prompts; subclasses implement ``letter_logits``."""

    backend = "base"

    def __init__(self, model: str, adapter: str | None = None, name: str | None = None,
                 n_threads: int | None = None, add_bos: bool | None = None):
        self.model = model
        self.adapter = adapter
        self.name = name
        self.n_threads = n_threads
        self.add_bos = add_bos

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = models.display_name(self.model)
        return base if not self.adapter else f"{base}+{Path(self.adapter).stem}"

    def identity(self) -> dict:
        """What decides this expert's answers: backend, model, weight format and the adapter's bytes."""
        return {"backend": self.backend, "model": self.model, "weights": getattr(self, "weights", None),
                "adapter": None if self.adapter is None else artifacts.file_sha256(self.adapter)}

    def _bos(self) -> bool:
        return gguf_add_bos(models.locate(self.model, "llm")) if self.add_bos is None else self.add_bos

    def letter_logits(self, prompts: Sequence[str], n_choices: int = 4) -> np.ndarray:
        """Logits of the next token being " A", " B", ... after each prompt, shape (N, n_choices)."""
        raise NotImplementedError

    def choice_probs(self, prompts: Sequence[str], n_choices: int = 4) -> np.ndarray:
        """Each prompt's distribution over the answer letters (softmax over the letters' logits)."""
        return softmax(self.letter_logits(prompts, n_choices).astype(np.float64)).astype(np.float32)

    def count_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def encode(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.label!r})"


BACKENDS: dict[str, type[Expert]] = {}


def backend(name: str):
    def deco(cls):
        cls.backend = name
        BACKENDS[name] = cls
        return cls
    return deco


def _letter_ids(encode, n_choices: int) -> list[int]:
    ids = []
    for letter in LETTERS[:n_choices]:
        toks = encode(" " + letter)
        if len(toks) != 1:
            raise ResourceUnavailable(f"' {letter}' is not a single token for this tokenizer ({toks})")
        ids.append(toks[0])
    return ids


@backend("llama_cpp")
class LlamaCppExpert(Expert):
    """llama-cpp-python on a GGUF base model with an optional GGUF LoRA adapter.

    One prompt per ``llama_decode`` call with logits requested at its last token only. ``weights``
    "native" runs the GGUF as shipped; "F16" (or another ``models.QUANT_TYPES`` entry) runs a copy
    re-encoded once by llama.cpp: on AVX2 CPUs F16 has a GEMM kernel that Q4_1 lacks and processes
    prompts about 1.8x faster, with the same values as the dequantised 4-bit weights.
    """

    def __init__(self, model: str, adapter: str | None = None, name: str | None = None,
                 n_threads: int | None = None, add_bos: bool | None = None, n_ctx: int = 2048,
                 weights: str = "native", verbose: bool = False):
        super().__init__(model, adapter, name, n_threads, add_bos)
        self.n_ctx = n_ctx
        self.weights = weights
        self.verbose = verbose
        self._llm = None

    def _load(self):
        if self._llm is not None:
            return self._llm
        try:
            import llama_cpp
        except ImportError:
            raise ResourceUnavailable("llama-cpp-python is not installed; run `bash run.sh setup`") from None
        path = (models.locate(self.model, "llm") if self.weights == "native"
                else models.requantized(self.model, self.weights))
        if self.adapter is not None:
            from .lora import check_adapter
            # llama.cpp would fail vaguely or crash on a misfit; a re-encoded file has the packaged one's shapes
            check_adapter(self.adapter, models.locate(self.model, "llm"))
        threads = self.n_threads or os.cpu_count()
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=512,
                                  n_threads=threads, n_threads_batch=threads, lora_path=self.adapter,
                                  verbose=self.verbose)
        except ValueError as exc:
            where = self.adapter if self.adapter and "LoRA" in str(exc) else path
            raise InputError(f"llama.cpp could not load it ({exc})", path=where) from None
        adds_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false").lower() == "true"
        self._bos_id = llm.token_bos() if (adds_bos if self.add_bos is None else self.add_bos) else None
        self._letters = {}
        self._llm = llm
        return llm

    def encode(self, prompt: str) -> list[int]:
        llm = self._load()
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
        return ([self._bos_id] if self._bos_id is not None else []) + ids

    def _fit(self, ids: list[int]) -> list[int]:
        """Keep a prompt within the context, dropping tokens from the front (after BOS) if it is longer."""
        if len(ids) <= self.n_ctx:
            return ids
        head = ids[:1] if self._bos_id is not None else []
        return head + ids[len(ids) - (self.n_ctx - len(head)):]

    def last_logits(self, ids: Sequence[int]):
        """Decode ``ids`` from an empty cache; a pointer to the last position's logits (n_vocab floats)."""
        import llama_cpp

        llm = self._load()
        llm.reset()
        llm.eval(self._fit(list(ids)))
        return llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)

    def letter_logits(self, prompts, n_choices=4):
        llm = self._load()
        if n_choices not in self._letters:
            self._letters[n_choices] = _letter_ids(
                lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), n_choices)
        letter_ids = self._letters[n_choices]
        out = np.empty((len(prompts), n_choices), dtype=np.float32)
        for row, prompt in enumerate(prompts):
            ptr = self.last_logits(self.encode(prompt))
            out[row] = [ptr[t] for t in letter_ids]
        return out

    def close(self):
        if self._llm is not None:
            self._llm.close()
            self._llm = None


@backend("transformers")
class TransformersExpert(Expert):
    """transformers (fp32, CPU) on the dequantised GGUF, with an optional peft adapter folder."""

    def __init__(self, model: str, adapter: str | None = None, name: str | None = None,
                 n_threads: int | None = None, add_bos: bool | None = None, batch_size: int = 8):
        super().__init__(model, adapter, name, n_threads, add_bos)
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        if self._model is not None:
            return self._model
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        path = models.hf_model_dir(self.model)
        self._tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if self.adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, self.adapter)
        model.eval()
        self._bos_id = self._tok.bos_token_id if self._bos() else None
        self._model = model
        return model

    def encode(self, prompt: str) -> list[int]:
        self._load()
        ids = self._tok(prompt, add_special_tokens=False)["input_ids"]
        return ([self._bos_id] if self._bos_id is not None else []) + ids

    def letter_logits(self, prompts, n_choices=4):
        import torch

        model = self._load()
        letter_ids = _letter_ids(lambda s: self._tok(s, add_special_tokens=False)["input_ids"], n_choices)
        seqs = [self.encode(p) for p in prompts]
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = np.empty((len(seqs), n_choices), dtype=np.float32)
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        for start in range(0, len(seqs), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(seqs[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, width - len(seqs[r]):] = torch.tensor(seqs[r])
                mask[j, width - len(seqs[r]):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               logits_to_keep=1).logits[:, -1, :]
            out[rows] = logits[:, letter_ids].float().numpy()
        return out


@dataclass(frozen=True)
class ExpertSpec:
    """Where an expert comes from: a registered or local model, optional adapter, backend.

    ``cluster`` and ``device`` place it in the paper's layout (Table I): the prompt cluster its adapter
    was tuned on (None for a base model) and the edge server it is assigned to.
    """

    name: str
    model: str
    adapter: str | None = None
    backend: str = "llama_cpp"
    cluster: int | None = None
    device: str | None = None

    def build(self, **options) -> Expert:
        return make_expert(self.model, adapter=self.adapter, backend=self.backend, name=self.name, **options)


REGISTRY_FIELDS = {"name": str, "base_model": str, "cluster": (int, type(None)), "device": (str, type(None)),
                   "adapter": (str, type(None))}


def write_registry(path, specs: Sequence[ExpertSpec], **extra_fields) -> Path:
    """Write ``experts.json``: a list of ``{name, base_model, cluster, device, adapter}`` (DESIGN.md §5).

    Adapter paths are stored relative to the file's folder so the registry moves with its artifacts;
    ``extra_fields`` maps an expert name to more keys for its entry.
    """
    root = Path(path).resolve().parent
    entries = []
    for s in specs:
        adapter = None
        if s.adapter is not None:
            a = Path(s.adapter).resolve()
            adapter = str(a.relative_to(root)) if a.is_relative_to(root) else str(a)
        entries.append({"name": s.name, "base_model": s.model, "cluster": s.cluster, "device": s.device,
                        "adapter": adapter, "backend": s.backend, **extra_fields.get(s.name, {})})
    return artifacts.write_json(path, entries)


def read_registry(path) -> list[ExpertSpec]:
    """Read ``experts.json``; a missing field, wrong type, duplicate name or missing adapter names the entry."""
    path = Path(path)
    entries = artifacts.read_json(path)
    if not isinstance(entries, list) or not entries:
        raise InputError("an experts registry is a non-empty JSON list of expert entries", path=path)
    specs, seen = [], set()
    for i, e in enumerate(entries):
        where = f"[{i}]"
        if not isinstance(e, dict):
            raise InputError("each entry is an object", path=path, param=where)
        for key, kind in REGISTRY_FIELDS.items():
            if key not in e:
                raise InputError(f"missing field {key!r}", path=path, param=where)
            if not isinstance(e[key], kind) or isinstance(e[key], bool):
                raise InputError(f"{key} has the wrong type {type(e[key]).__name__}", path=path,
                                 param=f"{where}.{key}")
        if e["name"] in seen:
            raise InputError(f"duplicate expert name {e['name']!r}", path=path, param=f"{where}.name")
        seen.add(e["name"])
        if why := models.unusable(e["base_model"], "llm"):
            raise InputError(why, path=path, param=f"{where}.base_model")
        adapter = e["adapter"]
        if adapter is not None:
            adapter = Path(adapter) if Path(adapter).is_absolute() else path.resolve().parent / adapter
            if not adapter.exists():
                raise InputError(f"adapter file {adapter} does not exist (adapters are built by the experts stage, "
                                 "`bash run.sh reproduce`, and are not committed)", path=path, param=f"{where}.adapter")
            adapter = str(adapter)
        specs.append(ExpertSpec(e["name"], e["base_model"], adapter, e.get("backend", "llama_cpp"),
                                e["cluster"], e["device"]))
    return specs


def make_expert(model: str, *, backend: str = "llama_cpp", **options) -> Expert:
    """An expert of the named backend; unknown backends raise an error listing the known ones."""
    cls = BACKENDS.get(backend)
    if cls is None:
        raise InputError(f"unknown expert backend {backend!r}; known: {', '.join(sorted(BACKENDS))}",
                         param="backend")
    return cls(model, **options)
