"""LoRA fine-tuning of an expert on multiple-choice questions (paper §V-A, Appendix A, Table V).

Each example is the zero-shot prompt ``data.format_prompt(q)`` tokenised exactly as the experts score
it (text without special tokens, BOS prepended when the GGUF says so) followed by one target token,
the answer letter " A"/" B"/... as ``experts._letter_ids`` finds it. The loss is the cross-entropy of
that token at the prompt's last position only: batches are left-padded (as ``TransformersExpert``
scores them) so that the letter is always predicted at position -1 and only that position's logits
are computed — Gemma's 262k-token vocabulary makes full-sequence logits the largest cost otherwise.

Table V's values were lost in extraction; the defaults here are the usual LoRA recipe for small
models: r=8, alpha=16, dropout 0.05 on the attention projections, AdamW (lr 2e-4, no weight decay),
3% linear warm-up then cosine decay, gradient clipping at 1.0, one epoch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifacts, models
from .data import Question, format_prompt
from .errors import InputError

DONE = "meta.json"  # written last into an expert's folder: the fine-tuning is complete
ENCODING = "whole-prompts-over-cutoff-dropped"  # how examples are built; part of the reuse fingerprint


class LoraFineTuner:
    """Fine-tune a LoRA adapter of ``base_model`` so its next token after each prompt is the answer letter.

    After ``fit``: ``history_`` (one dict per optimizer step: step, loss, lr, tokens_per_s),
    ``n_train_``, ``final_loss_`` (mean loss of the last 10% of steps), ``wall_time_s_``,
    ``adapter_dir_`` (the saved peft folder when ``out_dir`` was given) and ``model_`` (the peft model,
    only when training ran in this process).
    """

    def __init__(self, base_model: str, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 cutoff_len: int = 256, epochs: int = 1, batch_size: int = 8, grad_accum: int = 1,
                 lr: float = 2e-4, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 warmup_ratio: float = 0.03, max_steps: int | None = None, seed: int = 0,
                 n_threads: int = 2, progress: bool = True):
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

    def get_params(self) -> dict:
        keys = ("base_model", "rank", "alpha", "dropout", "target_modules", "cutoff_len", "epochs",
                "batch_size", "grad_accum", "lr", "weight_decay", "max_grad_norm", "warmup_ratio",
                "max_steps", "seed")
        params = {k: getattr(self, k) for k in keys}
        params["target_modules"] = list(params["target_modules"])
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

    # -- data ------------------------------------------------------------------------------------------
    def load_base(self):
        """The base model (fp32, train mode off) and its tokenizer, from ``models.hf_model_dir``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = models.hf_model_dir(self.base_model)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, tok

    def encode(self, tokenizer, questions: Sequence[Question]) -> list[tuple[list[int], int]]:
        """(prompt ids, letter id) per question, tokenised exactly as the experts score them (never cut)."""
        from .experts import _letter_ids, gguf_add_bos

        bos = tokenizer.bos_token_id if gguf_add_bos(models.locate(self.base_model, "llm")) else None
        n_choices = max(len(q.choices) for q in questions)
        letters = _letter_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"], n_choices)
        out = []
        for q in questions:
            ids = tokenizer(format_prompt(q), add_special_tokens=False)["input_ids"]
            out.append(([bos] + ids if bos is not None else ids, letters[q.answer]))
        return out

    def within_cutoff(self, examples) -> np.ndarray:
        """Indices of the examples whose prompt fits ``cutoff_len``; longer ones are dropped, not cut,
        because a cut prompt (its passage gone) is not what the expert is later asked."""
        return np.flatnonzero([len(ids) <= self.cutoff_len for ids, _ in examples])

    @staticmethod
    def collate(examples, pad_id: int):
        """Left-padded ids, attention mask, position ids and letter targets of a batch."""
        import torch

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
    def batch_loss(model, ids, mask, pos, target, reduction: str = "mean"):
        """Cross-entropy of the letter token at the last position only (the prompt tokens carry no loss)."""
        import torch.nn.functional as F

        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1, :]
        return F.cross_entropy(logits.float(), target, reduction=reduction)

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
    def fingerprint(self, questions: Sequence[Question]) -> str:
        """What a finished folder must match to be reused: parameters and the training questions."""
        return artifacts.digest({"params": self.get_params(), "encoding": ENCODING,
                                 "questions": [q.source for q in questions],
                                 "prompts": [format_prompt(q) for q in questions],
                                 "answers": [q.answer for q in questions]})

    def fit(self, questions: Sequence[Question], out_dir=None):
        """Train on ``questions``; with ``out_dir``, save the adapter there and skip if it is already done.

        The folder is built in a temporary sibling and renamed into place with ``meta.json`` inside,
        so an interrupted run leaves no half-written expert and simply trains again.
        """
        self._check()
        questions = list(questions)
        if not questions:
            raise InputError("no training questions", param="questions")
        key = self.fingerprint(questions)
        if out_dir is not None:
            out_dir = Path(out_dir)
            done = out_dir / DONE
            if done.exists() and (out_dir / "adapter_model.safetensors").exists():  # a marker alone is no adapter
                meta = artifacts.read_json(done)
                if meta.get("fingerprint") == key:
                    self._from_meta(meta, out_dir)
                    return self
            for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        self._train(questions)
        if out_dir is not None:
            self._save(out_dir, key)
        return self

    def _train(self, questions):
        import torch
        from peft import LoraConfig, get_peft_model
        from tqdm.auto import tqdm
        from transformers import get_cosine_schedule_with_warmup

        t0 = time.time()
        torch.set_num_threads(self.n_threads)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        base, tok = self.load_base()
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        model.train()
        examples = self.encode(tok, questions)
        keep = self.within_cutoff(examples)
        if not len(keep):
            raise InputError(f"all {len(examples)} training prompts are longer than cutoff_len={self.cutoff_len} "
                             "tokens", param="cutoff_len")
        self.n_over_cutoff_ = len(examples) - len(keep)
        examples = [examples[i] for i in keep]
        lengths = np.array([len(ids) for ids, _ in examples])
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
        bar = tqdm(total=n_steps, desc=f"LoRA {models.display_name(self.base_model)}", disable=not self.progress)
        for i, rows in enumerate(batches):
            ids, mask, pos, target = self.collate([examples[r] for r in rows], pad)
            loss = self.batch_loss(model, ids, mask, pos, target)
            (loss * len(rows) / sum(len(batches[j]) for j in self._group(i, len(batches)))).backward()
            losses.append((loss.item(), len(rows)))
            tokens += int(mask.sum())
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
        self.adapter_dir_ = None
        self.skipped_ = False
        return self

    def _group(self, i: int, n: int) -> range:
        start = i - i % self.grad_accum
        return range(start, min(start + self.grad_accum, n))

    def _save(self, out_dir: Path, key: str):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            self.model_.save_pretrained(tmp, safe_serialization=True)
            tokens_per_s = [h["tokens_per_s"] for h in self.history_]
            artifacts.write_json(tmp / "history.json", self.history_)
            artifacts.write_json(tmp / DONE, {
                "fingerprint": key, "params": self.get_params(), "n_train": self.n_train_,
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

    def _from_meta(self, meta: dict, out_dir: Path):
        self.history_ = artifacts.read_json(out_dir / "history.json")
        self.n_train_ = meta["n_train"]
        self.n_over_cutoff_ = meta.get("n_over_cutoff", 0)
        self.final_loss_ = meta["final_loss"]
        self.wall_time_s_ = meta["wall_time_s"]
        self.adapter_dir_ = out_dir
        self.skipped_ = True


# -- the experts stage's helpers ---------------------------------------------------------------------------
PAPER_ROLES = {"gemma3-270m": "Qwen2.5-7B", "smollm2-135m-instruct": "Qwen2.5-3B"}


def paper_role(base_model: str, cluster: int) -> str:
    """The paper's expert this one stands in for, e.g. "Qwen2.5-7B-FT0 (emulated by gemma3-270m)"."""
    paper = PAPER_ROLES.get(base_model)
    name = models.display_name(base_model)
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


def curves_figure(histories: dict, title: str = "LoRA training curves", smooth: int = 5):
    """Loss per optimizer step of each expert (thin: raw, thick: running mean over ``smooth`` steps)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, hist) in enumerate(histories.items()):
        steps = np.array([h["step"] for h in hist])
        loss = np.array([h["loss"] for h in hist])
        color = f"C{i % 10}"
        ax.plot(steps, loss, color=color, alpha=0.25, lw=0.8)
        k = smooth if len(loss) >= 2 * smooth else 1
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color=color, lw=1.8, label=name)
    ax.axhline(np.log(4), color="k", ls=":", lw=1, label="ln 4 (uniform over A–D)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy of the answer letter")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig
