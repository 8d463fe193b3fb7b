"""Text-target LoRA fine-tuning: training speed, and the text vs choice_ce targets on held-out accuracy.

    python benchmarks/bench_finetune.py speed   [--model smollm2-135m-instruct] [--items 64] [--threads 1 2]
    python benchmarks/bench_finetune.py compare [--model ...] [--train 150] [--test 100] [--variants ...]

``speed`` trains the text target on ``--items`` items of ``--task`` (CommonsenseQA) for one epoch (batch 8, r=16 on
attention + MLP projections) in several variants and prints tokens/s (real tokens, padding excluded), the
training loss and the loss on ``--heldout`` other items after the same examples, and the ratios to the first:
"random" batches (no length bucketing), ``LoraFineTuner``'s length-bucketed batches, bucketed at each
``--threads`` setting, LoRA on the upper half of the layers only (the backward pass stops there), on the
attention projections only, ``torch.compile``, and bf16 autocast where the CPU has AVX512-BF16/AMX (``lscpu``
flags; skipped with a note elsewhere). On a shared machine the numbers are noisy.

Items are the task's expert-training questions of the default profile's split (never a gating or test
question). ``compare`` trains each variant on the same ``--train`` items (1 epoch) and reports held-out
accuracy on ``--test`` other expert-training items, scoring each choice by log p(continuation | context)
per character of the continuation (acc_norm) and as a raw sum; the base model is scored too. Variants:
``text``, ``choice_ce`` (per-char normalised choice scores), ``choice_ce_sum`` (summed), and ``text:<key>=<v>,...``
overrides such as ``text:lr=3e-4`` or ``text:rank=8,modules=attn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe2lib.core.choice import normalise  # noqa: E402
from moe2lib.data.tasks import ChoiceItem, build_benchmark  # noqa: E402
from moe2lib.models.finetune import LoraFineTuner, LoraSettings  # noqa: E402
from moe2lib.pipeline.config import profile_benchmark  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULES = {"attn": ATTN, "mlp": MLP, "all": ATTN + MLP}
DEFAULTS = LoraSettings()  # the default profile's: text target, r=16 on all seven projections, lr 1e-3, batch 8


def load_items(task: str) -> list[ChoiceItem]:
    """The task's expert-training questions under the default profile's edge-mix split (seed 0): what
    experts train on, never a gating-training or test question, so no choice made here sees the test split."""
    fractions = profile_benchmark("default")["fractions"]
    return build_benchmark([task], fractions=fractions, seed=0).where("expert")


def split(items, n_train, n_test, seed=0):
    idx = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in idx[:n_train]], [items[i] for i in idx[n_train:n_train + n_test]]


def score(ft: LoraFineTuner, model, tok, items, batch_items: int = 8) -> dict:
    """Held-out accuracy by per-char normalised and by summed continuation log-likelihood."""
    import torch

    scorer = LoraFineTuner(ft.base_model, LoraSettings(target="choice_ce", choice_norm="sum"))
    examples = scorer.encode(tok, items)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    right_char = right_sum = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_items):
            chunk = examples[start:start + batch_items]
            ids, mask, pos, labels, _ = scorer.collate(chunk, pad)
            ll = scorer.token_logprobs(model, ids, mask, pos, labels).sum(-1).numpy()
            at = 0
            for it, ex in zip(items[start:start + batch_items], chunk):
                lp = ll[at:at + len(ex.choices)]
                at += len(ex.choices)
                chars = [len(c) for c in it.continuations]
                right_char += int(np.argmax(normalise(lp, None, chars)) == it.gold)
                right_sum += int(np.argmax(lp) == it.gold)
    return {"acc_char": right_char / len(items), "acc_sum": right_sum / len(items)}


def parse_variant(name: str) -> LoraSettings:
    kind, _, rest = name.partition(":")
    kw = {}
    if kind == "text":
        kw["target"] = "text"
    elif kind == "choice_ce":
        kw.update(target="choice_ce", choice_norm="char")
    elif kind == "choice_ce_sum":
        kw.update(target="choice_ce", choice_norm="sum")
    else:
        raise SystemExit(f"unknown variant {name!r}")
    for pair in filter(None, rest.split(",")):
        key, value = pair.split("=")
        if key == "modules":
            kw["target_modules"] = MODULES[value]
        elif key in ("rank", "batch_size", "epochs"):
            kw[key] = int(value)
        else:
            kw[key] = float(value)
    if "rank" in rest and "alpha" not in rest:
        kw["alpha"] = 2 * kw["rank"]
    return replace(DEFAULTS, **kw)


def compare(args):
    items = load_items(args.task)
    train, test = split(items, args.train, args.test, seed=args.seed)
    rows = []
    base_ft = LoraFineTuner(args.model, n_threads=args.threads[0], progress=False)
    model, tok = base_ft.load_base()
    rows.append({"variant": "base", **score(base_ft, model, tok, test)})
    print(json.dumps(rows[-1]), flush=True)
    del model
    for name in args.variants:
        t0 = time.time()
        ft = LoraFineTuner(args.model, parse_variant(name), n_threads=args.threads[0], progress=False,
                           seed=args.seed).fit(train)
        train_s = time.time() - t0
        res = score(ft, ft.model_, ft.tokenizer_, test)
        tps = float(np.median([h["tokens_per_s"] for h in ft.history_]))
        rows.append({"variant": name, **res, "final_loss": round(ft.final_loss_, 4), "steps": len(ft.history_),
                     "train_s": round(train_s, 1), "tokens_per_s": round(tps, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}: {len(train)} train / {len(test)} held-out {args.task} items, seed {args.seed}")
    print(f"{'variant':40s} {'acc_char':>8s} {'acc_sum':>8s} {'loss':>7s} {'train_s':>8s}")
    for r in rows:
        print(f"{r['variant']:40s} {r['acc_char']:8.3f} {r['acc_sum']:8.3f} {r.get('final_loss', float('nan')):7.3f} "
              f"{r.get('train_s', float('nan')):8.1f}")


def heldout_loss(ft: LoraFineTuner, items, batch: int = 8) -> float:
    """Token-weighted mean text-target loss of the trained model on ``items`` (not trained on)."""
    import torch

    examples = [ex for ex in ft.encode(ft.tokenizer_, items) if len(ex.ids) <= ft.settings.cutoff_len]
    pad = ft.tokenizer_.pad_token_id if ft.tokenizer_.pad_token_id is not None else 0
    total = count = 0.0
    ft.model_.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            total += float(ft.batch_loss(ft.model_, *ft.collate(chunk, pad), reduction="sum"))
            count += sum(ex.n_target for ex in chunk)
    return total / count


def speed(args):
    import torch

    from moe2lib.models.finetune import bf16_supported

    pool = load_items(args.task)
    items, held = pool[:args.items], pool[args.items:args.items + args.heldout]
    n_layers = None
    rows = []

    def run(label, threads=args.threads[0], bucketed=True, **kw):
        ft = LoraFineTuner(args.model, replace(DEFAULTS, target="text", **kw), n_threads=threads, progress=False,
                           seed=0)
        if not bucketed:  # shuffled batches, no sorting by length
            ft._order = lambda lengths, rng: [b for b in np.array_split(rng.permutation(len(lengths)),
                                                                       -(-len(lengths) // ft.settings.batch_size))]
        t0 = time.time()
        try:
            ft.fit(items)
        except Exception as exc:  # a variant that fails here (e.g. no compiler for torch.compile) is reported
            print(f"{label:34s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            return None
        wall = time.time() - t0
        tokens = sum(h["tokens"] for h in ft.history_)
        step_s = sum(h["tokens"] / h["tokens_per_s"] for h in ft.history_)
        row = {"variant": label, "tokens_per_s": tokens / step_s, "tokens": tokens, "steps": len(ft.history_),
               "step_s": step_s, "wall_s": wall, "train_loss": ft.final_loss_,
               "heldout_loss": heldout_loss(ft, held)}
        rows.append(row)
        print(f"{label:34s} {row['tokens_per_s']:8.0f} tokens/s  {row['train_loss']:6.3f} {row['heldout_loss']:8.3f}"
              f"  ({tokens} tokens, {len(ft.history_)} steps, {step_s:.1f} s in steps, {wall:.1f} s with load)",
              flush=True)
        return ft

    print(f"{args.model}, {len(items)} {args.task} expert-training items (1 epoch, batch {DEFAULTS.batch_size}, "
          f"r={DEFAULTS.rank}), loss on {len(held)} other ones; torch {torch.__version__}\n")
    print(f"{'variant':34s} {'tokens/s':>8s} {'loss':>13s} {'held-out':>8s}")
    t1 = args.threads[0]
    first = run(f"random batches, {t1} thr", bucketed=False)
    if first is not None:
        n_layers = first.model_.get_base_model().config.num_hidden_layers
    run(f"bucketed, {t1} thr")
    for t in args.threads[1:]:
        run(f"bucketed, {t} thr", threads=t)
    if n_layers:
        upper = list(range(n_layers // 2, n_layers))
        run(f"bucketed, layers {upper[0]}-{upper[-1]} only", layers=upper)
        if len(args.threads) > 1:
            run(f"bucketed, {args.threads[-1]} thr, layers {upper[0]}-{upper[-1]}", threads=args.threads[-1],
                layers=upper)
    run("bucketed, attention only", target_modules=ATTN)
    if "compile" in args.extra:
        run("bucketed, torch.compile", compile=True)
    if bf16_supported() or args.force_bf16:
        run("bucketed, bf16 autocast", precision="bf16")
    else:
        print(f"{'bucketed, bf16 autocast':34s} skipped: this CPU has no AVX512-BF16/AMX flag (fp32 only; "
              "--force-bf16 runs it anyway)")
    ref = rows[0] if rows else None
    if ref:
        print("\nratios to the first line (tokens/s; held-out loss after the same examples):")
        for r in rows:
            print(f"  {r['variant']:34s} {r['tokens_per_s'] / ref['tokens_per_s']:5.2f}x   "
                  f"held-out loss {r['heldout_loss']:.3f} ({r['heldout_loss'] - ref['heldout_loss']:+.3f})")
    print("(wall-clock on a shared machine: noisy; the ratios come from one run)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("speed", "compare"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="commonsense_qa", help="a moe2lib.data.tasks task name")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch threads; compare uses the first")
    p.add_argument("--train", type=int, default=150)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=["text", "choice_ce", "choice_ce_sum"])
    p.add_argument("--heldout", type=int, default=48, help="speed: items for the held-out loss")
    p.add_argument("--extra", nargs="*", default=["compile"], help="speed: optional variants to run (compile)")
    p.add_argument("--force-bf16", action="store_true", help="speed: run bf16 autocast without AVX512-BF16/AMX")
    p.add_argument("--json", help="speed: also write the rows to this file")
    args = p.parse_args(argv)
    (speed if args.mode == "speed" else compare)(args)


if __name__ == "__main__":
    main()
