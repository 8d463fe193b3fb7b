"""LoRA fine-tuning of an expert on multiple-choice questions (paper §V-A, Appendix A, Table V).

Each example is the zero-shot prompt ``data.format_prompt(q)`` tokenised exactly as the experts score
it (text without special tokens, BOS prepended when the GGUF says so) followed by one target token,
the answer letter " A"/" B"/... as ``experts.answer_letter_ids`` finds it. The loss is the cross-entropy of
that token at the prompt's last position only: batches are left-padded (as ``TransformersExpert``
scores them) so that the letter is always predicted at position -1 and only that position's logits
are computed — Gemma's 262k-token vocabulary makes full-sequence logits the largest cost otherwise.

Table V's values were lost in extraction; the defaults here are the usual LoRA recipe for small
models: r=8, alpha=16, dropout 0.05 on the attention projections, AdamW (lr 2e-4, no weight decay),
3% linear warm-up then cosine decay, gradient clipping at 1.0, one epoch.

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


def bf16_supported(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag)."""
    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


class LoraFineTuner:
    """Fine-tune a LoRA adapter of ``base_model`` on multiple-choice questions.

    ``target``: ``"letter"`` (``fit`` takes :class:`~moe2lib.data.loaders.Question`s; the next token after
    each prompt is the answer letter), ``"text"`` (``fit`` takes :class:`~moe2lib.data.tasks.ChoiceItem`s;
    the gold continuation's tokens after its context) or ``"choice_ce"`` (ChoiceItems; the gold choice
    under the softmax over all choices' log-likelihoods, normalised by ``choice_norm``).

    Speed options (``benchmarks/bench_finetune.py speed`` measures each): ``layers`` puts LoRA on these
    transformer layers only (peft's ``layers_to_transform``; the upper half of the layers also spares
    the backward pass through the lower half), ``precision="bf16"`` runs the forward pass under bf16
    autocast (fast only on CPUs with AVX512-BF16 or AMX: :func:`bf16_supported`), ``compile`` wraps the
    model in ``torch.compile``.

    After ``fit``: ``history_`` (one dict per optimizer step: step, loss, lr, tokens_per_s),
    ``n_train_``, ``n_over_cutoff_``, ``final_loss_`` (mean loss of the last 10% of steps), ``wall_time_s_``,
    ``fingerprint_`` (of the parameters and questions), ``model_`` and ``tokenizer_``. ``save`` writes the
    adapter to a folder (``adapter_dir_``); :func:`fit_saved` reuses such a folder or fits and saves one.
    """

    def __init__(self, base_model: str, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 cutoff_len: int = 256, epochs: int = 1, batch_size: int = 8, grad_accum: int = 1,
                 lr: float = 2e-4, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 warmup_ratio: float = 0.03, max_steps: int | None = None, seed: int = 0,
                 n_threads: int = 2, progress: bool = True, target: str = "letter",
                 choice_norm: str = "char", layers: Sequence[int] | None = None, precision: str = "fp32",
                 compile: bool = False):
        self.base_model = base_model
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = target_modules
        self.cutoff_len = cutoff_len
        self.epochs = epochs
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.warmup_ratio = warmup_ratio
        self.max_steps = max_steps
        self.seed = seed
        self.n_threads = n_threads
        self.progress = progress
        self.target = target
        self.choice_norm = choice_norm
        self.layers = layers
        self.precision = precision
        self.compile = compile

    def get_params(self) -> dict:
        keys = ("base_model", "rank", "alpha", "dropout", "target_modules", "cutoff_len", "epochs",
                "batch_size", "grad_accum", "lr", "weight_decay", "max_grad_norm", "warmup_ratio",
                "max_steps", "seed")
        params = {k: getattr(self, k) for k in keys}
        params["target_modules"] = list(params["target_modules"])
        if self.target != "letter":  # letter experts keep the fingerprint they had before text targets
            params["target"] = self.target
            if self.target == "choice_ce":
                params["choice_norm"] = self.choice_norm
        if self.layers is not None:  # options that change the adapter enter the fingerprint when set
            params["layers"] = [int(i) for i in self.layers]
        if self.precision != "fp32":
            params["precision"] = self.precision
        return params

    def _check(self):
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

    def _check_items(self, items) -> list:
        """The training items as a list, of the kind ``target`` needs (Questions or ChoiceItems)."""
        from ..data.tasks import ChoiceItem

        items = list(items)
        if not items:
            raise InputError("no training questions", param="questions")
        kind, name = (Question, "Question") if self.target == "letter" else (ChoiceItem, "ChoiceItem")
        bad = next((x for x in items if not isinstance(x, kind)), None)
        if bad is not None:
            hint = (" (text targets train on moe2lib.data.tasks.ChoiceItem)" if self.target == "letter"
                    and isinstance(bad, ChoiceItem) else
                    " (the letter target trains on moe2lib.data.loaders.Question)" if isinstance(bad, Question) else "")
            raise InputError(f"target={self.target!r} trains on {name}s, got a {type(bad).__name__}{hint}",
                             param="questions")
        if self.target != "letter":
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
        if self.target == "letter":
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

        if self.target == "text":
            return [choice(it, it.gold) for it in items]
        return [ChoiceExample(tuple(choice(it, c) for c in range(it.n_choices)), it.gold,
                              tuple(float(max(1, len(t))) if self.choice_norm == "char" else 1.0
                                    for t in it.continuations)) for it in items]

    def within_cutoff(self, examples) -> np.ndarray:
        """Indices of the examples whose prompt fits ``cutoff_len``; longer ones are dropped, not cut,
        because a cut prompt (its passage gone) is not what the expert is later asked. For text
        targets the length is context plus continuation (of the longest choice for ``choice_ce``)."""
        return np.flatnonzero([_length(ex) <= self.cutoff_len for ex in examples])

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
        window = 16 * self.batch_size
        batches = []
        for start in range(0, len(perm), window):
            chunk = perm[start:start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    # -- training --------------------------------------------------------------------------------------
    def fingerprint(self, questions: Sequence) -> str:
        """What a finished folder must match to be reused: parameters (the target among them) and the
        training questions (for ChoiceItems: id, source, every (context, continuation) pair and gold)."""
        if self.target == "letter":
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
        import torch
        from peft import LoraConfig, get_peft_model
        from tqdm.auto import tqdm
        from transformers import get_cosine_schedule_with_warmup

        t0 = time.time()
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        base, tok = self.load_base()
        layers = None if self.layers is None else [int(i) for i in self.layers]
        n_layers = base.config.num_hidden_layers
        if layers is not None and max(layers) >= n_layers:
            raise InputError(f"{self.base_model} has {n_layers} layers (0..{n_layers - 1}), not {max(layers)}",
                             param="layers")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                            layers_to_transform=layers)
        model = get_peft_model(base, config)
        model.train()
        forward = torch.compile(model, dynamic=True) if self.compile else model
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        examples = self.encode(tok, questions)
        keep = self.within_cutoff(examples)
        if not len(keep):
            raise InputError(f"all {len(examples)} training prompts are longer than cutoff_len={self.cutoff_len} "
                             "tokens", param="cutoff_len")
        self.n_over_cutoff_ = len(examples) - len(keep)
        examples = [examples[i] for i in keep]
        lengths = np.array([_length(ex) for ex in examples])
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        epochs = [self._order(lengths, rng) for _ in range(self.epochs)]
        batches = [b for e in epochs for b in e]
        n_steps = -(-len(batches) // self.grad_accum)
        if self.max_steps is not None:
            n_steps = min(n_steps, self.max_steps)
            batches = batches[:n_steps * self.grad_accum]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(round(self.warmup_ratio * n_steps)), n_steps)
        history, tokens, tic = [], 0, time.time()
        losses = []
        bar = tqdm(total=n_steps, desc=f"LoRA {registry.display_name(self.base_model)}", disable=not self.progress)
        # each batch's mean loss is weighted by what it averages over: examples, or continuation tokens
        weight = ([sum(examples[r].n_target for r in rows) for rows in batches] if self.target == "text"
                  else [len(rows) for rows in batches])
        for i, rows in enumerate(batches):
            batch = self.collate([examples[r] for r in rows], pad)
            with autocast:
                loss = self.batch_loss(forward, *batch)
            (loss * weight[i] / sum(weight[j] for j in self._group(i, len(batches)))).backward()
            losses.append((loss.item(), weight[i]))
            tokens += int(batch[1].sum())
            if (i + 1) % self.grad_accum and i + 1 < len(batches):
                continue
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            now = time.time()
            step_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
            history.append({"step": len(history) + 1, "loss": step_loss, "lr": lr,
                            "tokens_per_s": tokens / max(now - tic, 1e-9), "tokens": tokens})
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{history[-1]['tokens_per_s']:.0f}")
            losses, tokens, tic = [], 0, time.time()
        bar.close()
        model.eval()
        self.model_ = model
        self.tokenizer_ = tok
        self.history_ = history
        self.n_train_ = len(examples)
        tail = history[-max(1, len(history) // 10):]
        self.final_loss_ = float(np.mean([h["loss"] for h in tail]))
        self.wall_time_s_ = time.time() - t0
        self.adapter_dir_ = None  # a new adapter: not saved yet
        return self

    def _group(self, i: int, n: int) -> range:
        start = i - i % self.grad_accum
        return range(start, min(start + self.grad_accum, n))

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


def fit_all(jobs, workers: int = 1) -> list[LoraFineTuner]:
    """:func:`fit_saved` of ``(tuner, questions, out_dir)`` jobs, ``workers`` at once in processes of their own.

    The tuners returned are read back from their folders, with ``skipped_`` False for the ones trained now.
    Give each tuner ``n_threads`` = the cores / ``workers``.
    """
    jobs = [tuple(j) for j in jobs]
    if parallel.check_workers(workers) == 1:
        return [fit_saved(tuner, q, d) for tuner, q, d in jobs]
    trained = parallel.run(_fit_job, jobs, workers, desc=f"LoRA fine-tuning ({workers} at once)")
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
