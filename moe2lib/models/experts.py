"""Experts: language models that give, for each prompt, a distribution over the answer letters.

Backends plug into ``BACKENDS`` (name -> class). Both shipped backends tokenise a prompt the same
way — the text without special tokens, then the BOS token prepended when the GGUF says so
(``tokenizer.ggml.add_bos_token``) — because a BOS on one side only moves the logits by more than 1.
Only the last position's logits are computed and read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.loaders import LETTERS
from ..errors import InputError, ResourceUnavailable
from ..infra import artifacts, parallel
from . import registry


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


def adds_bos(metadata) -> bool:
    """Whether a model's tokenizer prepends BOS, from its GGUF header fields (``tokenizer.ggml.add_bos_token``;
    a llama-cpp-python model's ``metadata``, or :func:`gguf_metadata`)."""
    return str(metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def gguf_add_bos(path) -> bool:
    """Whether the model file's tokenizer prepends BOS (:func:`adds_bos` of its header)."""
    return adds_bos(gguf_metadata(str(path)))


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
        base = registry.display_name(self.model)
        return base if not self.adapter else f"{base}+{Path(self.adapter).stem}"

    def identity(self) -> dict:
        """What decides this expert's answers: backend, model, weight format and the adapter's bytes."""
        return {"backend": self.backend, "model": self.model, "weights": getattr(self, "weights", None),
                "adapter": None if self.adapter is None else artifacts.file_sha256(self.adapter)}

    def _bos(self) -> bool:
        return gguf_add_bos(registry.locate(self.model, "llm")) if self.add_bos is None else self.add_bos

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

    def encode_continuation(self, text: str) -> list[int]:
        """A continuation's tokens: the text alone, no BOS or special tokens (as lm-eval does)."""
        raise NotImplementedError

    def continuation_logprobs(self, requests: Sequence[Sequence[tuple[str, str]]],
                              progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per question (a sequence of (context, continuation) pairs, one per choice): the sum of
        log p(token | everything before it) over each continuation's tokens (float64, shape (n,)) and
        the continuation's token counts. Contexts are tokenised by ``encode``, continuations by
        ``encode_continuation``, and the two token lists concatenated."""
        raise NotImplementedError

    def _choice_tokens(self, requests):
        """(context ids + continuation ids, index of the first continuation token) per choice, per question."""
        out = []
        for q, req in enumerate(requests):
            if len(req) < 1:
                raise InputError(f"question {q} has no choices", param="requests")
            ctx_cache, seqs = {}, []
            for ctx, cont in req:
                cont_ids = self.encode_continuation(cont)
                if not cont_ids:
                    raise InputError(f"question {q}: continuation {cont!r} has no tokens", param="requests")
                if ctx not in ctx_cache:
                    ctx_cache[ctx] = self.encode(ctx)
                    if not ctx_cache[ctx]:
                        raise InputError(f"question {q}: empty context (nothing to condition on)", param="requests")
                seqs.append((ctx_cache[ctx] + cont_ids, len(ctx_cache[ctx])))
            out.append(seqs)
        return out

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


def _progress(items, on: bool, desc: str):
    if not on:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="q")


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all of ``seqs``."""
    n = min(len(s) for s in seqs)
    for j in range(n):
        t = seqs[0][j]
        if any(s[j] != t for s in seqs):
            return j
    return n


def answer_letter_ids(encode, n_choices: int) -> list[int]:
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
    "native" runs the GGUF as shipped; "F16" (or another ``registry.QUANT_TYPES`` entry) runs a copy
    re-encoded once by llama.cpp: on AVX2 CPUs F16 has a GEMM kernel that Q4_1 lacks and processes
    prompts about 1.8x faster, with the same values as the dequantised 4-bit weights. "merged" runs the
    adapter merged into such a copy once (``lora.merge_gguf``, ``lora.MERGE_DTYPE``) with no run-time
    adapter, at the base model's speed; the run-time adapter path stays the reference.
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
        if self.adapter is not None:
            from .lora import check_adapter
            # llama.cpp would fail vaguely or crash on a misfit; a re-encoded file has the packaged one's shapes
            check_adapter(self.adapter, registry.locate(self.model, "llm"))
        merged = self.weights == "merged"
        if merged:
            from .lora import MERGE_DTYPE, merge_gguf
            path = (merge_gguf(self.adapter, self.model) if self.adapter is not None
                    else registry.requantized(self.model, MERGE_DTYPE))
        else:
            path = (registry.locate(self.model, "llm") if self.weights == "native"
                    else registry.requantized(self.model, self.weights))
        threads = self.n_threads or os.cpu_count()
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=512,
                                  n_threads=threads, n_threads_batch=threads,
                                  lora_path=None if merged else self.adapter,
                                  verbose=self.verbose)
        except ValueError as exc:
            where = self.adapter if self.adapter and "LoRA" in str(exc) else path
            raise InputError(f"llama.cpp could not load it ({exc})", path=where) from None
        bos = adds_bos(llm.metadata) if self.add_bos is None else self.add_bos
        self._bos_id = llm.token_bos() if bos else None
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
            self._letters[n_choices] = answer_letter_ids(
                lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), n_choices)
        letter_ids = self._letters[n_choices]
        out = np.empty((len(prompts), n_choices), dtype=np.float32)
        for row, prompt in enumerate(prompts):
            ptr = self.last_logits(self.encode(prompt))
            out[row] = [ptr[t] for t in letter_ids]
        return out

    N_SEQ = 8  # choices decoded together (sequences of the scoring context)
    N_UBATCH = 32  # its micro-batch: see _choice_context

    def encode_continuation(self, text):
        return self._load().tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _choice_context(self):
        """A second llama.cpp context on the loaded weights, for continuation scoring (one per load).

        It has ``N_SEQ`` sequences in one unified KV cache: llama.cpp lets one token belong to several
        sequences ("coupled" sequences) only in a unified cache, and the Llama object's own context
        has a single sequence. The LoRA adapter, if any, is attached to it as well.
        """
        llm = self._load()
        if getattr(self, "_choice_for", None) is llm:
            return self._choice_ctx, self._choice_batch
        import contextlib
        import ctypes

        import llama_cpp
        from llama_cpp import _internals

        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_seq_max, params.kv_unified = self.N_SEQ, True
        # llama.cpp 0.3.36's CPU attention mixes up sequences that share a micro-batch (cf.
        # ggml-org/llama.cpp#24962): without flash attention from ~32 tokens, with it from 64 (its tiled
        # kernel), log-probs came out up to 1 nat off. Flash attention on micro-batches of at most 32
        # tokens matched decoding each choice alone in every layout tried, at the same speed here.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_ubatch = min(params.n_ubatch, self.N_UBATCH)
        ctx = llm._stack.enter_context(contextlib.closing(  # freed by llm.close(), before the weights
            _internals.LlamaContext(model=llm._model, params=params, verbose=self.verbose)))
        if llm._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, (ctypes.c_float * 1)(llm.lora_scale)):
                raise ResourceUnavailable("llama.cpp could not attach the LoRA adapter to the scoring context")
        batch = llm._stack.enter_context(contextlib.closing(
            _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=self.N_SEQ, verbose=self.verbose)))
        self._choice_for, self._choice_ctx, self._choice_batch = llm, ctx, batch
        return ctx, batch

    def _logprob_sums(self, seqs) -> np.ndarray:
        """Sum of log p over ``ids[start:]`` for each (ids, start) of one question, from an empty cache.

        One ``llama_decode``: the tokens common to all choices carry every choice's sequence id and
        are evaluated once, each choice's remaining tokens carry its own; logits are computed only at
        positions that predict a continuation token, and no choice's last token is decoded. In steps: fit the
        choices into the context (:meth:`_fit_choices`), lay out the batch (:meth:`_DecodePlan.of`), decode it
        (:meth:`_decode`) and sum the continuations' log-probabilities (:func:`_continuation_sums`).
        """
        import llama_cpp

        ctx, batch = self._choice_context()
        limit = min(llama_cpp.llama_n_ctx(ctx.ctx), llama_cpp.llama_n_batch(ctx.ctx))
        choices = self._fit_choices(seqs, limit)
        if choices is None:  # too long to decode together: one choice at a time
            return np.concatenate([self._logprob_sums([s]) for s in seqs])
        plan = _DecodePlan.of(choices)
        return _continuation_sums(choices, plan, self._decode(ctx, batch, plan))

    def _fit_choices(self, seqs, limit: int) -> "_Choices | None":
        """The (ids, start) pairs of one question as a :class:`_Choices` whose decoded tokens fit ``limit``. None when
        several choices do not fit together; a lone choice too long loses context tokens from the front (after
        BOS), never continuation tokens (InputError when that is not enough)."""
        ids, starts = [s for s, _ in seqs], [st for _, st in seqs]
        ends = [len(s) - 1 for s in ids]  # positions 0..end-1 are decoded
        shared = min(_common_prefix(ids), max(ends))
        if shared + sum(max(e - shared, 0) for e in ends) <= limit:
            return _Choices(ids, starts, ends, shared)
        if len(seqs) > 1:
            return None
        head, cut = (1 if self._bos_id is not None else 0), ends[0] - limit
        if starts[0] - cut <= head:  # drop context tokens from the front (after BOS), never continuation
            raise InputError(f"a continuation of {len(ids[0]) - starts[0]} tokens does not fit "
                             f"in a context of {limit}")
        return _Choices([ids[0][:head] + ids[0][head + cut:]], [starts[0] - cut], [limit], limit)

    def _decode(self, ctx, batch, plan: "_DecodePlan") -> list[np.ndarray]:
        """Decode ``plan`` from an empty cache in the scoring context; the logits of its wanted rows, in order
        (views into llama.cpp's buffer: valid until the next decode)."""
        import llama_cpp

        b = batch.batch
        b.n_tokens = len(plan.tokens)
        out_idx = []
        for k, (tok, pos, sids, want) in enumerate(zip(plan.tokens, plan.positions, plan.seq_ids, plan.wants)):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, len(sids), want
            for m, sid in enumerate(sids):
                b.seq_id[k][m] = sid
            if want:
                out_idx.append(k)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        if (rc := llama_cpp.llama_decode(ctx.ctx, b)) != 0:
            raise ResourceUnavailable(f"llama_decode failed with status {rc} on a batch of {len(plan.tokens)} tokens")
        n_vocab = self._llm.n_vocab()
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, k), shape=(n_vocab,)) for k in out_idx]

    def continuation_logprobs(self, requests, progress=False, shared=True):
        """See ``Expert.continuation_logprobs``. ``shared=False`` decodes each choice on its own from an
        empty cache (the reference that the shared-prefix batch must reproduce)."""
        out = []
        for seqs in _progress(self._choice_tokens(requests), progress, "questions"):
            groups = ([seqs[g:g + self.N_SEQ] for g in range(0, len(seqs), self.N_SEQ)] if shared
                      else [[s] for s in seqs])
            out.append((np.concatenate([self._logprob_sums(g) for g in groups]),
                        np.array([len(ids) - st for ids, st in seqs])))
        return out

    def close(self):
        if self._llm is not None:
            self._llm.close()
            self._llm = None


@dataclass
class _Choices:
    """One question's choices as one decode reads them: each choice's ``ids`` (context then continuation), the
    index of its first continuation token (``starts``), the positions decoded (``0..end-1``: all but the last
    token, ``ends``) and how many leading positions all choices share (decoded once)."""

    ids: list[list[int]]
    starts: list[int]
    ends: list[int]
    shared: int


@dataclass
class _DecodePlan:
    """A ``llama_decode`` batch, one entry per token: its id, position, sequence ids and whether its logits are
    wanted (it predicts a continuation token). ``row[(choice, position)]`` is that position's row among the
    ``n_out`` wanted logits (a shared position has one row for all choices)."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_ids: list[tuple[int, ...]] = field(default_factory=list)
    wants: list[bool] = field(default_factory=list)
    row: dict[tuple[int, int], int] = field(default_factory=dict)
    n_out: int = 0

    def add(self, token: int, pos: int, seq_ids: tuple[int, ...], want: bool) -> None:
        self.tokens.append(token)
        self.positions.append(pos)
        self.seq_ids.append(seq_ids)
        self.wants.append(want)
        if want:
            for i in seq_ids:
                self.row[i, pos] = self.n_out
            self.n_out += 1

    @classmethod
    def of(cls, c: _Choices) -> "_DecodePlan":
        """The shared positions once, with every choice's sequence id, then each choice's own positions."""
        everyone = tuple(range(len(c.ids)))
        plan = cls()
        for j in range(c.shared):
            plan.add(c.ids[0][j], j, everyone, any(c.starts[i] - 1 <= j < c.ends[i] for i in everyone))
        for i in everyone:
            for j in range(c.shared, c.ends[i]):
                plan.add(c.ids[i][j], j, (i,), j >= c.starts[i] - 1)
        return plan


def _continuation_sums(c: _Choices, plan: _DecodePlan, rows: list[np.ndarray]) -> np.ndarray:
    """Per choice, the sum over its continuation tokens of log p(token | before it), from the plan's logits."""
    lse = np.empty(plan.n_out)
    for r, x in enumerate(rows):  # log-sum-exp per needed position; exp in float32, sum in float64
        m = x.max()
        lse[r] = float(m) + np.log(np.exp(x - m).sum(dtype=np.float64))
    sums = np.zeros(len(c.ids))
    for i in range(len(c.ids)):
        for j in range(c.starts[i] - 1, c.ends[i]):
            r = plan.row[i, j]
            sums[i] += float(rows[r][c.ids[i][j + 1]]) - lse[r]
    return sums


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

        path = registry.hf_model_dir(self.model)
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
        with parallel.torch_threads(self.n_threads):  # restored after: torch's thread count is process-wide
            return self._letter_logits(prompts, n_choices)

    def _letter_logits(self, prompts, n_choices):
        import torch

        model = self._load()
        letter_ids = answer_letter_ids(lambda s: self._tok(s, add_special_tokens=False)["input_ids"], n_choices)
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

    def encode_continuation(self, text):
        self._load()
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def continuation_logprobs(self, requests, progress=False):
        """See ``Expert.continuation_logprobs``: the reference path, one left-padded row per choice
        (context + continuation minus its last token) and logits only at the last positions."""
        with parallel.torch_threads(self.n_threads):
            return self._continuation_logprobs(requests, progress)

    def _continuation_logprobs(self, requests, progress):
        import torch

        model = self._load()
        toks = self._choice_tokens(requests)
        flat = [(q, i, ids, len(ids) - st) for q, seqs in enumerate(toks) for i, (ids, st) in enumerate(seqs)]
        sums = [np.zeros(len(seqs)) for seqs in toks]
        order = np.argsort([len(f[2]) for f in flat], kind="stable")
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        for start in _progress(range(0, len(flat), self.batch_size), progress, "batches"):
            rows = [flat[k] for k in order[start:start + self.batch_size]]
            width, keep = max(len(r[2]) - 1 for r in rows), max(r[3] for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (_, _, seq, _) in enumerate(rows):
                ids[j, width - len(seq) + 1:] = torch.tensor(seq[:-1])
                mask[j, width - len(seq) + 1:] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
                for j, (q, i, seq, nc) in enumerate(rows):
                    lp = torch.log_softmax(logits[j, keep - nc:].double(), dim=-1)
                    sums[q][i] = lp[torch.arange(nc), torch.tensor(seq[-nc:])].sum().item()
        return [(sums[q], np.array([len(ids) - st for ids, st in seqs])) for q, seqs in enumerate(toks)]


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
    """Write ``experts.json``: a list of ``{name, base_model, cluster, device, adapter}`` (docs/method.md §4).

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
        if why := registry.unusable(e["base_model"], "llm"):
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
