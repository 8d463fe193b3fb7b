"""LoRA fine-tuning of an expert on multiple-choice questions (paper §V-A, Appendix A, Table V).

Each example is the zero-shot prompt ``data.format_prompt(q)`` tokenised exactly as the experts score
it (text without special tokens, BOS prepended when the GGUF says so) followed by one target token,
the answer letter " A"/" B"/... as ``experts.answer_letter_ids`` finds it. The loss is the cross-entropy of
that token at the prompt's last position only: batches are left-padded (as ``TransformersExpert``
scores them) so that the letter is always predicted at position -1 and only that position's logits
are computed — Gemma's 262k-token vocabulary makes full-sequence logits the largest cost otherwise.

Table V's values were lost in extraction; :class:`LoraSettings` holds ours, and its defaults are the ones the
default profile trains its experts with (``notebooks/03_experts.ipynb``): the text target, r=16, alpha=32,
dropout 0.05 on all seven attention and MLP projections, examples up to 256 tokens, one epoch in batches of 8,
AdamW (lr 1e-3, no weight decay), 3% linear warm-up then cosine decay, gradient clipping at 1.0.

Text targets (``target="text"`` or ``"choice_ce"``) train on :class:`~moe2lib.data.tasks.ChoiceItem`s, the
way the choice scorer reads them: per choice the context ids (BOS as above) followed by the
continuation ids, each tokenised separately without special tokens. ``"text"`` trains the gold
continuation alone: the loss is the mean cross-entropy over its tokens (the context carries none).
``"choice_ce"`` puts every choice of an item in the batch and takes the cross-entropy of the gold choice
under the softmax over the choices' log-likelihoods (summed, or per character of the continuation with
``choice_norm="char"``, as acc_norm scores them). Either way the decoder runs to its hidden states and the
output head (with Gemma's final soft-capping when its config has it) runs only at the positions that
predict a continuation token. Tiny models learn little more than a letter bias from the letter target;
for them the text target moved SmolLM2-135M from 37% to 57% (per-char normalised) on held-out
CommonsenseQA (r=16 on attention and MLP projections, lr 1e-3, batch 8, one epoch on 600 questions).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ..data.loaders import Question, format_prompt
from ..errors import InputError
from ..infra import artifacts, parallel
from . import registry

DONE = "meta.json"  # written last into an expert's folder: the fine-tuning is complete
ENCODING = "whole-prompts-over-cutoff-dropped"  # how examples are built; part of the reuse fingerprint
TEXT_ENCODING = "context+continuation-ids-over-cutoff-dropped"  # the same for text targets
TARGETS = ("letter", "text", "choice_ce")
CHOICE_NORMS = ("sum", "char")
PRECISIONS = ("fp32", "bf16")
IGNORE = -100  # label of a position that carries no loss


class TextExample(NamedTuple):
    """Context ids followed by continuation ids (one sequence, as scored); the last ``n_target`` are trained."""

    ids: list[int]
    n_target: int


class ChoiceExample(NamedTuple):
    """One item's choices (each a :class:`TextExample`), the gold index and each choice's normaliser."""

    choices: tuple[TextExample, ...]
    gold: int
    norms: tuple[float, ...]


def _length(example) -> int:
    if isinstance(example, ChoiceExample):
        return max(len(c.ids) for c in example.choices)
    return len(example[0])


@dataclass
class _Plan:
    """One fit's batches: rows of ``examples`` for every epoch in turn, cut to ``n_steps`` optimizer steps of
    ``grad_accum`` batches; ``weights`` is what each batch's mean loss averages over (examples, or continuation
    tokens for the text target); ``n_over_cutoff`` examples were left out as longer than ``cutoff_len``."""

    examples: list
    batches: list[np.ndarray]
    weights: list[int]
    n_steps: int
    grad_accum: int
    n_over_cutoff: int

    def step_weight(self, i: int) -> int:
        """The weight of the optimizer step batch ``i`` belongs to (its batches' weights summed)."""
        start = i - i % self.grad_accum
        return sum(self.weights[j] for j in range(start, min(start + self.grad_accum, len(self.batches))))

    def ends_step(self, i: int) -> bool:
        """Whether batch ``i`` is the last of its optimizer step."""
        return not ((i + 1) % self.grad_accum and i + 1 < len(self.batches))


@dataclass
class _StepTally:
    """The batches of one optimizer step so far: (mean loss, weight) each, their tokens, and since when."""

    losses: list[tuple[float, int]] = field(default_factory=list)
    tokens: int = 0
    since: float = field(default_factory=time.time)

    def add(self, loss: float, weight: int, tokens: int) -> None:
        self.losses.append((loss, weight))
        self.tokens += tokens

    def entry(self, step: int, lr: float) -> dict:
        """The step's history entry: its weighted mean loss, the learning rate it ran at, its token rate."""
        loss = sum(v * n for v, n in self.losses) / sum(n for _, n in self.losses)
        return {"step": step, "loss": loss, "lr": lr,
                "tokens_per_s": self.tokens / max(time.time() - self.since, 1e-9), "tokens": self.tokens}


def bf16_supported(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag)."""
    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention + MLP
# the parameters a fine-tuning's fingerprint covers, in meta.json's order (besides the options below, when set)
FINGERPRINT_KEYS = ("rank", "alpha", "dropout", "target_modules", "cutoff_len", "epochs", "batch_size", "grad_accum",
                    "lr", "weight_decay", "max_grad_norm", "warmup_ratio", "max_steps")


@dataclass(frozen=True)
class LoraSettings:
    """How an expert is fine-tuned (Table V): the defaults are the default profile's values.

    ``target``: ``"text"`` (train on :class:`~moe2lib.data.tasks.ChoiceItem`s: the gold continuation's tokens
    after its context), ``"choice_ce"`` (ChoiceItems: the gold choice under the softmax over all choices'
    log-likelihoods, normalised by ``choice_norm``: ``"char"`` per character, ``"sum"`` not at all) or
    ``"letter"`` (:class:`~moe2lib.data.loaders.Question`s: the answer letter after the prompt).
    ``rank``, ``alpha``, ``dropout``, ``target_modules``: the LoRA adapter (peft's ``LoraConfig``).
    ``cutoff_len``: the longest example trained on, in tokens (longer ones are dropped, never cut).
    ``epochs``, ``batch_size``, ``grad_accum`` (forward passes per optimizer step), ``max_steps`` (None: as many
    as the examples give): the schedule; ``lr``, ``weight_decay``, ``max_grad_norm``, ``warmup_ratio``: AdamW
    with linear warm-up then cosine decay, and gradient clipping.

    Speed options (``benchmarks/bench_finetune.py speed`` measures each): ``layers`` puts LoRA on these
    transformer layers only (peft's ``layers_to_transform``; the upper half of the layers also spares
    the backward pass through the lower half), ``precision="bf16"`` runs the forward pass under bf16
    autocast (fast only on CPUs with AVX512-BF16 or AMX: :func:`bf16_supported`), ``compile`` wraps the
    model in ``torch.compile``.
    """

    target: str = "text"
    rank: int = 16
    alpha: float = 32  # as the profile gives it: the fingerprint tells 32 from 32.0
    dropout: float = 0.05
    target_modules: Sequence[str] = PROJECTIONS
    cutoff_len: int = 256
    epochs: int = 2  # one underfits (docs/method.md §8)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03
    max_steps: int | None = None
    layers: Sequence[int] | None = None
    choice_norm: str = "char"
    precision: str = "fp32"
    compile: bool = False

    def check(self) -> None:
        """InputError naming the first value out of range."""
        for key in ("rank", "epochs", "batch_size", "grad_accum", "cutoff_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"must be a positive integer, not {getattr(self, key)!r}", param=key)
        if not self.lr > 0:
            raise InputError(f"must be positive, not {self.lr!r}", param="lr")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"must be in [0, 1), not {self.warmup_ratio!r}", param="warmup_ratio")
        if not 0 <= self.dropout < 1:
            raise InputError(f"must be in [0, 1), not {self.dropout!r}", param="dropout")
        if self.target not in TARGETS:
            raise InputError(f"must be one of {', '.join(TARGETS)}, not {self.target!r}", param="target")
        if self.choice_norm not in CHOICE_NORMS:
            raise InputError(f"must be one of {', '.join(CHOICE_NORMS)}, not {self.choice_norm!r}",
                             param="choice_norm")
        if self.precision not in PRECISIONS:
            raise InputError(f"must be one of {', '.join(PRECISIONS)}, not {self.precision!r}", param="precision")
        if self.layers is not None and (isinstance(self.layers, str) or not self.layers or not all(
                isinstance(i, (int, np.integer)) and i >= 0 for i in self.layers)):
            raise InputError(f"must be None or a non-empty list of layer indices, not {self.layers!r}",
                             param="layers")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise InputError(f"must be a non-empty list of module names, not {self.target_modules!r}",
                             param="target_modules")


class LoraFineTuner:
    """Fine-tune a LoRA adapter of ``base_model`` on multiple-choice questions, as ``settings`` say.

    ``fit`` takes :class:`~moe2lib.data.loaders.Question`s for the letter target and
    :class:`~moe2lib.data.tasks.ChoiceItem`s for the text targets (see :class:`LoraSettings`). ``seed`` fixes the
    LoRA initialisation, dropout and batch order; ``n_threads`` is torch's threads while fitting; ``progress``
    shows a progress bar.

    After ``fit``: ``history_`` (one dict per optimizer step: step, loss, lr, tokens_per_s),
    ``n_train_``, ``n_over_cutoff_``, ``final_loss_`` (mean loss of the last 10% of steps), ``wall_time_s_``,
    ``fingerprint_`` (of the parameters and questions), ``model_`` and ``tokenizer_``. ``save`` writes the
    adapter to a folder (``adapter_dir_``); :func:`fit_saved` reuses such a folder or fits and saves one.
    """

    def __init__(self, base_model: str, settings: LoraSettings = LoraSettings(), *, seed: int = 0,
                 n_threads: int = 2, progress: bool = True):
        self.base_model = base_model
        self.settings = settings
        self.seed = seed
        self.n_threads = n_threads
        self.progress = progress

    def get_params(self) -> dict:
        """What defines the adapter: meta.json's ``params`` and the fingerprint's. Options enter it only when they
        are not their defaults, so that the experts trained before they existed keep their fingerprints."""
        s = self.settings
        params = {"base_model": self.base_model, **{k: getattr(s, k) for k in FINGERPRINT_KEYS}, "seed": self.seed}
        params["target_modules"] = list(params["target_modules"])
        if s.target != "letter":  # letter experts keep the fingerprint they had before text targets
            params["target"] = s.target
            if s.target == "choice_ce":
                params["choice_norm"] = s.choice_norm
        if s.layers is not None:  # options that change the adapter enter the fingerprint when set
            params["layers"] = [int(i) for i in s.layers]
        if s.precision != "fp32":
            params["precision"] = s.precision
        return params

    def _check(self):
        if not isinstance(self.settings, LoraSettings):
            raise InputError(f"must be a LoraSettings, not {type(self.settings).__name__}", param="settings")
        self.settings.check()

    def _check_items(self, items) -> list:
        """The training items as a list, of the kind ``target`` needs (Questions or ChoiceItems)."""
        from ..data.tasks import ChoiceItem

        items = list(items)
        if not items:
            raise InputError("no training questions", param="questions")
        kind, name = (Question, "Question") if self.settings.target == "letter" else (ChoiceItem, "ChoiceItem")
        bad = next((x for x in items if not isinstance(x, kind)), None)
        if bad is not None:
            hint = (" (text targets train on moe2lib.data.tasks.ChoiceItem)" if self.settings.target == "letter"
                    and isinstance(bad, ChoiceItem) else
                    " (the letter target trains on moe2lib.data.loaders.Question)" if isinstance(bad, Question) else "")
            raise InputError(f"target={self.settings.target!r} trains on {name}s, got a {type(bad).__name__}{hint}",
                             param="questions")
        if self.settings.target != "letter":
            for it in items:
                if not (0 <= it.gold < it.n_choices == len(it.contexts)):
                    raise InputError(f"item {it.qid!r} ({it.source}): gold {it.gold} and {len(it.contexts)} "
                                     f"contexts do not fit its {it.n_choices} continuations", param="questions")
        return items

    # -- data ------------------------------------------------------------------------------------------
    def load_base(self):
        """The base model (fp32, train mode off) and its tokenizer, from ``registry.hf_model_dir``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = registry.hf_model_dir(self.base_model)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, tok

    def _bos(self, tokenizer) -> int | None:
        from .experts import gguf_add_bos

        return tokenizer.bos_token_id if gguf_add_bos(registry.locate(self.base_model, "llm")) else None

    def encode(self, tokenizer, questions: Sequence) -> list:
        """Training examples, tokenised exactly as the experts score them (never cut).

        Questions (letter target): (prompt ids, letter id) each. ChoiceItems: a :class:`TextExample` of the
        gold choice each (``target="text"``) or a :class:`ChoiceExample` of all choices (``"choice_ce"``).
        """
        from .experts import answer_letter_ids

        questions = list(questions)
        if questions and not isinstance(questions[0], Question):
            return self.encode_items(tokenizer, questions)
        bos = self._bos(tokenizer)
        n_choices = max(len(q.choices) for q in questions)
        letters = answer_letter_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"], n_choices)
        out = []
        for q in questions:
            ids = tokenizer(format_prompt(q), add_special_tokens=False)["input_ids"]
            out.append(([bos] + ids if bos is not None else ids, letters[q.answer]))
        return out

    def encode_items(self, tokenizer, items) -> list:
        """ChoiceItems as text examples: per choice context ids (BOS prepended as the scorer does) then
        continuation ids, each tokenised on its own without special tokens."""
        if self.settings.target == "letter":
            raise InputError("the letter target trains on moe2lib.data.loaders.Question, not ChoiceItems "
                             "(pass target='text' or 'choice_ce')", param="target")
        bos = self._bos(tokenizer)
        head = [bos] if bos is not None else []
        cache: dict[str, list[int]] = {}

        def ids_of(text):
            if text not in cache:
                cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
            return cache[text]

        def choice(it, c):
            cont = ids_of(it.continuations[c])
            if not cont:
                raise InputError(f"item {it.qid!r} ({it.source}): choice {c}'s continuation "
                                 f"{it.continuations[c]!r} has no tokens", param="questions")
            return TextExample(head + ids_of(it.contexts[c]) + cont, len(cont))

        if self.settings.target == "text":
            return [choice(it, it.gold) for it in items]
        return [ChoiceExample(tuple(choice(it, c) for c in range(it.n_choices)), it.gold,
                              tuple(float(max(1, len(t))) if self.settings.choice_norm == "char" else 1.0
                                    for t in it.continuations)) for it in items]

    def within_cutoff(self, examples) -> np.ndarray:
        """Indices of the examples whose prompt fits ``cutoff_len``; longer ones are dropped, not cut,
        because a cut prompt (its passage gone) is not what the expert is later asked. For text
        targets the length is context plus continuation (of the longest choice for ``choice_ce``)."""
        return np.flatnonzero([_length(ex) <= self.settings.cutoff_len for ex in examples])

    @staticmethod
    def collate(examples, pad_id: int):
        """Left-padded ids, attention mask, position ids and targets of a batch.

        Letter examples: targets are the letter ids, shape (B,). Text examples: the input is each
        sequence but its last token, and targets (B, T) hold the continuation tokens at the positions
        that predict them and ``IGNORE`` elsewhere. Choice examples: all choices of all items, in item
        order, plus (n_choices per item, gold per item, normaliser per choice).
        """
        import torch

        if examples and isinstance(examples[0], ChoiceExample):
            flat = [c for ex in examples for c in ex.choices]
            ids, mask, pos, labels = LoraFineTuner.collate(flat, pad_id)
            groups = (torch.tensor([len(ex.choices) for ex in examples]),
                      torch.tensor([ex.gold for ex in examples]),
                      torch.tensor([n for ex in examples for n in ex.norms], dtype=torch.float32))
            return ids, mask, pos, labels, groups
        if examples and isinstance(examples[0], TextExample):
            width = max(len(ex.ids) for ex in examples) - 1
            ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(examples), width), dtype=torch.long)
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            for j, (seq, k) in enumerate(examples):
                n = len(seq) - 1
                ids[j, width - n:] = torch.tensor(seq[:-1])
                mask[j, width - n:] = 1
                labels[j, width - k:] = torch.tensor(seq[-k:])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return ids, mask, pos, labels

        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for j, (seq, _) in enumerate(examples):
            ids[j, width - len(seq):] = torch.tensor(seq)
            mask[j, width - len(seq):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        target = torch.tensor([t for _, t in examples], dtype=torch.long)
        return ids, mask, pos, target

    @staticmethod
    def batch_loss(model, ids, mask, pos, target, groups=None, reduction: str = "mean"):
        """The loss of a collated batch; ``reduction="none"`` gives one value per example.

        Letter targets: cross-entropy of the letter at the last position only. Text targets: mean
        cross-entropy over the continuation tokens (``"none"``: each example's mean over its own tokens).
        Choice targets (``groups`` given): mean over items of -log softmax(choice log-likelihoods)[gold].
        """
        import torch
        import torch.nn.functional as F

        if target.dim() == 1:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1, :]
            return F.cross_entropy(logits.float(), target, reduction=reduction)
        logp = LoraFineTuner.token_logprobs(model, ids, mask, pos, target)
        if groups is None:
            counts = (target != IGNORE).sum(-1)
            if reduction == "none":
                return -logp.sum(-1) / counts
            return -logp.sum() / counts.sum() if reduction == "mean" else -logp.sum()
        n_choices, gold, norms = groups
        scores = logp.sum(-1) / norms
        table = torch.full((len(n_choices), int(n_choices.max())), float("-inf"), dtype=scores.dtype)
        item = torch.repeat_interleave(torch.arange(len(n_choices)), n_choices)
        slot = torch.arange(len(scores)) - torch.repeat_interleave(n_choices.cumsum(0) - n_choices, n_choices)
        table = table.index_put((item, slot), scores)
        return F.cross_entropy(table, gold, reduction=reduction)

    @staticmethod
    def token_logprobs(model, ids, mask, pos, labels):
        """log p(label) at each position whose label is not ``IGNORE`` (0 elsewhere), shape (B, T), fp32.

        The decoder runs to hidden states and the output head only at the labelled positions, which
        matters for Gemma's 262k-token vocabulary; Gemma's final logit soft-capping is applied when set.
        """
        import torch
        import torch.nn.functional as F

        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  use_cache=False).last_hidden_state
        where = labels != IGNORE
        logits = lm.get_output_embeddings()(hidden[where]).float()
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out = torch.zeros(labels.shape, dtype=torch.float32)
        return out.masked_scatter(where, -F.cross_entropy(logits, labels[where], reduction="none"))

    def _order(self, lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled batches of similar length (sort within windows of 16 batches), then shuffled."""
        perm = rng.permutation(len(lengths))
        window = 16 * self.settings.batch_size
        batches = []
        for start in range(0, len(perm), window):
            chunk = perm[start:start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.settings.batch_size] for i in range(0, len(chunk), self.settings.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    # -- training --------------------------------------------------------------------------------------
    def fingerprint(self, questions: Sequence) -> str:
        """What a finished folder must match to be reused: parameters (the target among them) and the
        training questions (for ChoiceItems: id, source, every (context, continuation) pair and gold)."""
        if self.settings.target == "letter":
            return artifacts.digest({"params": self.get_params(), "encoding": ENCODING,
                                     "questions": [q.source for q in questions],
                                     "prompts": [format_prompt(q) for q in questions],
                                     "answers": [q.answer for q in questions]})
        return artifacts.digest({"params": self.get_params(), "encoding": TEXT_ENCODING,
                                 "items": [[it.qid, it.source, [list(p) for p in it.pairs()], it.gold]
                                           for it in questions]})

    def fit(self, questions: Sequence) -> "LoraFineTuner":
        """Train on ``questions`` (Questions for the letter target, ChoiceItems for text targets).

        Only trains: :meth:`save` writes the adapter, :func:`fit_saved` reuses a finished folder.
        """
        self._check()
        questions = self._check_items(questions)
        with parallel.torch_threads(self.n_threads):
            self._train(questions)
        self.fingerprint_ = self.fingerprint(questions)
        return self

    def _train(self, questions):
        """Fit a fresh adapter on ``questions`` in three steps: the peft model (:meth:`_peft_model`), the batches
        (:meth:`_plan`) and the optimizer steps over them (:meth:`_optimize`); sets the fitted attributes."""
        import torch

        t0 = time.time()
        base, tok = self.load_base()
        # seeded after loading: a first load that converts the GGUF draws from torch's RNG (fresh weights)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        model = self._peft_model(base)
        plan = self._plan(self.encode(tok, questions), rng)
        history = self._optimize(model, plan, pad=tok.pad_token_id if tok.pad_token_id is not None else 0)
        model.eval()
        self.model_ = model
        self.tokenizer_ = tok
        self.history_ = history
        self.n_train_ = len(plan.examples)
        self.n_over_cutoff_ = plan.n_over_cutoff
        tail = history[-max(1, len(history) // 10):]
        self.final_loss_ = float(np.mean([h["loss"] for h in tail]))
        self.wall_time_s_ = time.time() - t0
        self.adapter_dir_ = None  # a new adapter: not saved yet
        return self

    def _peft_model(self, base):
        """``base`` with a new LoRA adapter (peft) on ``target_modules`` (of ``layers``, when set), in train mode."""
        from peft import LoraConfig, get_peft_model

        s = self.settings
        layers = None if s.layers is None else [int(i) for i in s.layers]
        n_layers = base.config.num_hidden_layers
        if layers is not None and max(layers) >= n_layers:
            raise InputError(f"{self.base_model} has {n_layers} layers (0..{n_layers - 1}), not {max(layers)}",
                             param="layers")
        config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                            target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM",
                            layers_to_transform=layers)
        model = get_peft_model(base, config)
        model.train()
        return model

    def _plan(self, examples: list, rng: np.random.Generator) -> "_Plan":
        """The examples within ``cutoff_len`` (InputError when none is) in batches: :meth:`_order` per epoch,
        cut to ``max_steps`` optimizer steps; each batch weighted by what its mean loss averages over."""
        s = self.settings
        keep = self.within_cutoff(examples)
        if not len(keep):
            raise InputError(f"all {len(examples)} training prompts are longer than cutoff_len={s.cutoff_len} "
                             "tokens", param="cutoff_len")
        n_over_cutoff = len(examples) - len(keep)
        examples = [examples[i] for i in keep]
        lengths = np.array([_length(ex) for ex in examples])
        epochs = [self._order(lengths, rng) for _ in range(s.epochs)]
        batches = [b for e in epochs for b in e]
        n_steps = -(-len(batches) // s.grad_accum)
        if s.max_steps is not None:
            n_steps = min(n_steps, s.max_steps)
            batches = batches[:n_steps * s.grad_accum]
        # examples, or continuation tokens for the text target
        weights = ([sum(examples[r].n_target for r in rows) for rows in batches] if s.target == "text"
                   else [len(rows) for rows in batches])
        return _Plan(examples, batches, weights, n_steps, s.grad_accum, n_over_cutoff)

    def _optimize(self, model, plan: "_Plan", pad: int) -> list[dict]:
        """Train ``model`` on the plan's batches: AdamW with linear warm-up and cosine decay, the gradients of
        ``grad_accum`` batches accumulated (:meth:`_backward`), then clipped. One history entry per optimizer step."""
        import torch
        from tqdm.auto import tqdm
        from transformers import get_cosine_schedule_with_warmup

        s = self.settings
        forward = torch.compile(model, dynamic=True) if s.compile else model
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if s.precision == "bf16"
                    else contextlib.nullcontext())
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(round(s.warmup_ratio * plan.n_steps)), plan.n_steps)
        history, tally = [], _StepTally()
        bar = tqdm(total=plan.n_steps, desc=f"LoRA {registry.display_name(self.base_model)}",
                   disable=not self.progress)
        for i in range(len(plan.batches)):
            self._backward(forward, autocast, plan, i, pad, tally)
            if not plan.ends_step(i):
                continue
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            history.append(tally.entry(len(history) + 1, lr))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", tok_s=f"{history[-1]['tokens_per_s']:.0f}")
            tally = _StepTally()
        bar.close()
        return history

    def _backward(self, forward, autocast, plan: "_Plan", i: int, pad: int, tally: "_StepTally") -> None:
        """The forward (under ``autocast``) and backward pass of batch ``i``: its mean loss, weighted by the batch's
        share of its optimizer step, adds to the gradients; the loss, weight and tokens go to ``tally``."""
        batch = self.collate([plan.examples[r] for r in plan.batches[i]], pad)
        with autocast:
            loss = self.batch_loss(forward, *batch)
        (loss * plan.weights[i] / plan.step_weight(i)).backward()
        tally.add(loss.item(), plan.weights[i], int(batch[1].sum()))

    def save(self, out_dir) -> Path:
        """Write the fitted adapter, ``history.json`` and ``meta.json`` (its fingerprint among them) to
        ``out_dir``, replacing what is there.

        The folder is built in a temporary sibling and renamed into place with ``meta.json`` inside, so an
        interrupted run leaves no half-written expert.
        """
        if not hasattr(self, "model_"):
            raise InputError("the tuner has no trained adapter to save: call fit() first", param="self")
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            self.model_.save_pretrained(tmp, safe_serialization=True)
            tokens_per_s = [h["tokens_per_s"] for h in self.history_]
            artifacts.write_json(tmp / "history.json", self.history_)
            artifacts.write_json(tmp / DONE, {
                "fingerprint": self.fingerprint_, "params": self.get_params(), "n_train": self.n_train_,
                "n_over_cutoff": self.n_over_cutoff_,
                "n_steps": len(self.history_), "final_loss": self.final_loss_,
                "wall_time_s": round(self.wall_time_s_, 2),
                "tokens_per_s": float(np.median(tokens_per_s)) if tokens_per_s else None,
                **artifacts.provenance()})
            if out_dir.exists():
                # the marker goes first: a kill inside rmtree must not leave meta.json beside missing weights
                (out_dir / DONE).unlink(missing_ok=True)
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.adapter_dir_ = out_dir
        return out_dir

    def _from_meta(self, meta: dict, out_dir: Path):
        self.history_ = artifacts.read_json(out_dir / "history.json")
        self.n_train_ = meta["n_train"]
        self.n_over_cutoff_ = meta.get("n_over_cutoff", 0)
        self.final_loss_ = meta["final_loss"]
        self.wall_time_s_ = meta["wall_time_s"]
        self.fingerprint_ = meta["fingerprint"]
        self.adapter_dir_ = out_dir
        self.skipped_ = True
        for stale in ("model_", "tokenizer_"):  # an earlier fit's model is not the reused adapter
            self.__dict__.pop(stale, None)


def fit_saved(tuner: LoraFineTuner, questions: Sequence, out_dir) -> LoraFineTuner:
    """The experts stage's resumable step: reuse ``out_dir`` when it holds a finished adapter of the same
    parameters and questions (``skipped_`` True), else fit the tuner and save it there (``skipped_`` False).

    A folder without ``meta.json`` or without weights (a clone carries only the small files) is trained
    again, and the temporaries an interrupted save left beside it are removed first.
    """
    tuner._check()
    questions = tuner._check_items(questions)
    out_dir = Path(out_dir)
    done = out_dir / DONE
    if done.exists() and (out_dir / "adapter_model.safetensors").exists():  # a marker alone is no adapter
        meta = artifacts.read_json(done)
        if meta.get("fingerprint") == tuner.fingerprint(questions):
            tuner._from_meta(meta, out_dir)
            return tuner
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tuner.fit(questions).save(out_dir)
    tuner.skipped_ = False
    return tuner


def _fit_job(tuner: LoraFineTuner, questions, out_dir) -> bool:
    return not fit_saved(tuner, questions, out_dir).skipped_


def training_cost(tuner: LoraFineTuner, questions: Sequence) -> float:
    """A job's relative training time: characters of its questions (context and gold answer of a ChoiceItem,
    question and choices of a Question), times the epochs; :func:`fit_all` starts the costliest first."""
    def chars(q):
        if isinstance(q, Question):
            return len(q.question) + sum(map(len, q.choices))
        return len(q.contexts[q.gold]) + len(q.continuations[q.gold])
    return tuner.settings.epochs * sum(map(chars, questions))


def fit_all(jobs, workers: int = 1) -> list[LoraFineTuner]:
    """:func:`fit_saved` of ``(tuner, questions, out_dir)`` jobs, ``workers`` at once in processes of their own.

    The tuners returned are read back from their folders, with ``skipped_`` False for the ones trained now.
    The costliest jobs (:func:`training_cost`) start first, so that the last to start are short ones.
    Give each tuner ``n_threads`` = the cores / ``workers``. Base models are converted (``registry.hf_model_dir``)
    here first, so that workers do not convert the same model twice at once.
    """
    jobs = [tuple(j) for j in jobs]
    if parallel.check_workers(workers) == 1:
        return [fit_saved(tuner, q, d) for tuner, q, d in jobs]
    for name in dict.fromkeys(tuner.base_model for tuner, _, _ in jobs):
        registry.hf_model_dir(name)
    trained = parallel.run(_fit_job, jobs, workers, desc=f"LoRA fine-tuning ({workers} at once)",
                           cost=[training_cost(tuner, q) for tuner, q, _ in jobs])
    out = []
    for (tuner, q, d), now in zip(jobs, trained):
        fit_saved(tuner, q, d)
        tuner.skipped_ = not now
        out.append(tuner)
    return out


# -- the experts stage's helpers ---------------------------------------------------------------------------
PAPER_ROLES = {"gemma3-270m": "Qwen2.5-7B", "smollm2-135m-instruct": "Qwen2.5-3B"}


def paper_role(base_model: str, cluster: int) -> str:
    """The paper's expert this one stands in for, e.g. "Qwen2.5-7B-FT0 (emulated by gemma3-270m)"."""
    paper = PAPER_ROLES.get(base_model)
    name = registry.display_name(base_model)
    return f"{paper}-FT{cluster} (emulated by {name})" if paper else f"{name}-FT{cluster}"


def select_examples(ft_cluster: np.ndarray, ft_dist: np.ndarray, cluster: int, max_examples: int,
                    min_examples: int = 0, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Indices of an expert's fine-tuning prompts: its cluster, sampled down to ``max_examples`` (0: all).

    A cluster smaller than ``min_examples`` is topped up with the other prompts nearest to its centroid
    (``ft_dist[:, cluster]``), so that a tiny cluster still gets a trainable adapter; ``info`` says how many.
    """
    ft_cluster, ft_dist = np.asarray(ft_cluster), np.asarray(ft_dist)
    if ft_dist.ndim != 2 or len(ft_dist) != len(ft_cluster) or not 0 <= cluster < ft_dist.shape[1]:
        raise InputError(f"cluster {cluster} is not in ft_dist of shape {ft_dist.shape}", param="cluster")
    if max_examples and min_examples > max_examples:
        raise InputError(f"min_examples {min_examples} exceeds max_examples {max_examples}", param="min_examples")
    members = np.flatnonzero(ft_cluster == cluster)
    rng = np.random.default_rng([seed, cluster])
    picked = np.sort(rng.choice(members, max_examples, replace=False)) if 0 < max_examples < len(members) else members
    topped = np.array([], dtype=int)
    if len(picked) < min_examples:
        others = np.flatnonzero(ft_cluster != cluster)
        nearest = others[np.argsort(ft_dist[others, cluster], kind="stable")]
        topped = nearest[:min_examples - len(picked)]
    info = {"cluster_size": int(len(members)), "n_from_cluster": int(len(picked)), "n_topped_up": int(len(topped))}
    return np.concatenate([picked, topped]).astype(int), info


def generalist_plan(expert_questions, seed: int = 0) -> dict[str, list]:
    """Per base model, the questions of its generalist: one adapter trained on all the experts' data.

    ``expert_questions`` maps an expert's name to ``(base_model, questions)``. The union of every expert's
    questions (each question once, by ``qid``, in the experts' order) is sampled down, seeded per base
    model, to as many questions as that base model's experts train on together: the same training budget
    as its experts, spread over every cluster instead of one.
    """
    union, seen, budget = [], set(), {}
    for base, questions in expert_questions.values():
        budget[base] = budget.get(base, 0) + len(questions)
        for q in questions:
            if q.qid not in seen:
                seen.add(q.qid)
                union.append(q)
    out = {}
    for base, n in budget.items():
        rng = np.random.default_rng([seed, int(hashlib.sha256(base.encode()).hexdigest()[:15], 16)])
        pick = np.sort(rng.choice(len(union), min(n, len(union)), replace=False))
        out[base] = [union[i] for i in pick]
    return out


def curves_figure(histories: dict, title: str = "LoRA training curves", smooth: int = 5,
                  ylabel: str = "cross-entropy of the answer letter", chance: float | None = float(np.log(4)),
                  chance_label: str = "ln 4 (uniform over A–D)"):
    """Loss per optimizer step of each expert (thin: raw, thick: running mean over ``smooth`` steps).

    ``chance`` draws a dotted reference line (None: none); text targets pass their own ``ylabel``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, hist) in enumerate(histories.items()):
        steps = np.array([h["step"] for h in hist])
        loss = np.array([h["loss"] for h in hist])
        color = f"C{i % 10}"
        ax.plot(steps, loss, color=color, alpha=0.25, lw=0.8)
        k = smooth if len(loss) >= 2 * smooth else 1
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color=color, lw=1.8, label=name)
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label=chance_label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def expert_curves_figure(runs: dict, target: str = "letter"):
    """The experts stage's figure: each expert's training loss per step, labelled with its Table I role.

    ``runs`` maps an expert's name to (role, history); the y-axis says what the loss is for ``target``.
    """
    curves = {f"{name} ({role.split(' ')[0]})": history for name, (role, history) in runs.items()}
    if target == "letter":
        return curves_figure(curves, "Experts: LoRA training loss per step")
    what = "the answer text, per token" if target == "text" else "the correct choice among the choices"
    return curves_figure(curves, "Experts: LoRA training loss per step", ylabel=f"cross-entropy of {what}",
                         chance=None)
