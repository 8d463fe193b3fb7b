"""Scoring throughput: llama.cpp against transformers fp32 on the same MMLU prompts.

    python benchmarks/bench_scoring.py [--n 200] [--threads 2] [--formats native,F16]

For each packaged base model it times the answer-letter scoring of the same stratified MMLU
prompts (last-position logits only) with the llama.cpp backend — on the packaged GGUF ("native")
and on copies re-encoded by llama.cpp's quantizer — and with the transformers backend (fp32,
batched with left padding), and prints prompt tokens/s, the llama.cpp/transformers ratio and how
closely the two backends agree (max |Δp| over the answer letters, argmax agreement).

    python benchmarks/bench_scoring.py --choice [--choice-n 40] [--threads 2]

The choice path instead: on the same MMLU-test and ARC-Easy questions (half each), questions/s of
the letter path (one prompt, logits at its last token) next to the choice path
(``continuation_logprobs``: each choice's text after "Question: ...\nAnswer:", shared prefix decoded
once) and the naive choice path (each choice decoded alone), and the choice path's cost against a
plain prefill: its time over the time ``Llama.eval`` takes for one sequence of as many tokens as the
question's context plus all its continuations (goal: at most 1.3).

    python benchmarks/bench_scoring.py --experts [--expert-n 40] [--threads 2]

Expert rows instead: questions/s of the letter path on the same MMLU prompts for the base model
(packaged file, F16 copy) and for an expert — a random LoRA adapter of the experts' shape (``--rank``,
``--modules``; a trained adapter costs the same) — applied by llama.cpp at run time and merged into the
weights once (``weights="merged"``, ``lora.merge_gguf``; F16 and Q8_0 merges). Each prompt is timed on
every row in turn, for ``--rounds`` rounds, keeping each prompt's best time: load on a shared machine
drifts over minutes. Prints merged-expert/base ratios (goal: >= 0.9 of the base).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moe2lib.core.choice import normalise
from moe2lib.data import loaders
from moe2lib.models import experts, lora, registry


def timed(expert, prompts):
    expert.letter_logits(prompts[:3])  # warm-up: page in weights, allocate buffers
    t0 = time.perf_counter()
    probs = expert.choice_probs(prompts)
    return time.perf_counter() - t0, probs


def choice_questions(n: int, seed: int):
    """n questions, half MMLU test and half ARC-Easy, as ChoiceItems (moe2lib.data.tasks)."""
    from moe2lib.data import tasks

    rng = np.random.default_rng(seed)
    out = []
    for name, k in (("mmlu", n // 2), ("arc_easy", n - n // 2)):
        items = tasks.load_task(name)
        out += [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]
    return out


def letter_prompt(item) -> str:
    q = loaders.Question(item.text, tuple(c.strip() for c in item.continuations), item.gold, item.task)
    return loaders.format_prompt(q)


def choice_section(args):
    """Letter path vs choice path (shared prefix, and naive) on the same questions; the prefill cost ratio."""
    items = choice_questions(args.choice_n, args.seed)
    reqs = [it.pairs() for it in items]
    gold = np.array([it.gold for it in items])
    print(f"\nchoice path: {len(items)} questions (MMLU test + ARC-Easy), {args.threads} threads; "
          "timings are wall-clock on a shared machine\n")
    header = (f"{'model':24s} {'path':22s} {'tokens':>7s} {'seconds':>8s} {'q/s':>6s} {'tok/s':>7s} {'acc':>6s}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        e = experts.LlamaCppExpert(name, n_threads=args.threads)
        prompts = [letter_prompt(it) for it in items]
        e.letter_logits(prompts[:2])
        e.continuation_logprobs(reqs[:2])  # warm-up: weights paged in, the scoring context made
        t0 = time.perf_counter()
        letter = [e.letter_logits([p], n_choices=it.n_choices)[0] for p, it in zip(prompts, items)]
        t_letter = time.perf_counter() - t0
        n_letter = sum(e.count_tokens(p) for p in prompts)
        t0 = time.perf_counter()
        scores = e.continuation_logprobs(reqs)
        t_choice = time.perf_counter() - t0
        t0 = time.perf_counter()
        e.continuation_logprobs(reqs, shared=False)
        t_naive = time.perf_counter() - t0
        # tokens the choice path covers: each distinct context plus every continuation
        seqs = e._choice_tokens(reqs)
        counted = [sum(map(len, {tuple(ids[:st]) for ids, st in q})) + sum(len(ids) - st for ids, st in q)
                   for q in seqs]
        decoded = []
        for q in seqs:
            ids = [s for s, _ in q]
            p = experts._common_prefix(ids)
            decoded.append(p + sum(max(len(s) - 1 - p, 0) for s in ids))
        # plain prefill of as many tokens as one sequence: the question's context, then all its continuations
        plain = [(sum((list(ids[st:]) for ids, st in q), list(q[0][0][:q[0][1]])) * 2)[:n]
                 for q, n in zip(seqs, counted)]
        e.last_logits(plain[0])
        t0 = time.perf_counter()
        for ids in plain:
            e.last_logits(ids)
        t_plain = time.perf_counter() - t0
        # the same sequences with full-vocabulary logits at as many positions as the choice path needs
        # (one per continuation token): what scoring must pay for the output layer, shared prefix or not
        n_out = [sum(len(ids) - st for ids, st in q) for q in seqs]
        t0 = time.perf_counter()
        for ids, k in zip(plain, n_out):
            e._logprob_sums([(ids, len(ids) - k)])
        t_plain_out = time.perf_counter() - t0
        e.close()
        char = np.array([normalise(lp, nt, [len(c) for _, c in r]).argmax() for (lp, nt), r in zip(scores, reqs)])
        acc_letter = np.mean([l.argmax() == g for l, g in zip(letter, gold)])
        n_choice, n = sum(counted), len(items)
        for path, tok, sec, acc in (("letter", n_letter, t_letter, acc_letter),
                                    ("choice shared prefix", n_choice, t_choice, (char == gold).mean()),
                                    ("choice naive", n_choice, t_naive, float("nan")),
                                    ("plain prefill (eval)", n_choice, t_plain, float("nan")),
                                    ("plain + same logits", n_choice, t_plain_out, float("nan"))):
            print(f"{name:24s} {path:22s} {tok:7d} {sec:8.2f} {n / sec:6.2f} {tok / sec:7.0f} {acc:6.3f}")
        print(f"{name:24s} cost of the choice path: {t_choice / t_plain:.2f}x a plain prefill (goal <= 1.3), "
              f"{t_choice / t_plain_out:.2f}x one with the same logits; naive/shared {t_naive / t_choice:.2f}x; "
              f"choice/letter time {t_choice / t_letter:.2f}x; {sum(decoded)} of {n_choice} counted tokens "
              f"decoded (shared prefix once, no last tokens), {sum(n_out)} logit rows")


def expert_section(args):
    """Base (native, F16) vs expert (run-time adapter, merged): letter-path questions/s, best of rounds."""
    import tempfile
    from pathlib import Path

    prompts = [loaders.format_prompt(q) for q in loaders.mmlu_sample(args.expert_n, args.seed)]
    print(f"\nexpert rows: {len(prompts)} MMLU test prompts, {args.threads} threads, random LoRA r={args.rank} on "
          f"{args.modules}, best of {args.rounds} interleaved rounds; wall-clock on a shared machine\n")
    header = f"{'model':24s} {'expert':28s} {'q/s':>6s} {'tok/s':>7s} {'vs base':>8s} {'vs F16':>7s}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            peft = lora.random_adapter(name, Path(tmp) / "peft", rank=args.rank, modules=args.modules.split(","))
            adapter = str(lora.export_gguf(peft, registry.locate(name, "llm"), Path(tmp) / "adapter.gguf"))
            rows = {"base native": experts.LlamaCppExpert(name, weights="native", n_threads=args.threads),
                    "base F16": experts.LlamaCppExpert(name, weights="F16", n_threads=args.threads),
                    "expert runtime-adapter": experts.LlamaCppExpert(name, adapter, n_threads=args.threads),
                    "expert runtime-adapter F16": experts.LlamaCppExpert(name, adapter, weights="F16",
                                                                         n_threads=args.threads),
                    f"expert merged ({lora.MERGE_DTYPE})": experts.LlamaCppExpert(name, adapter, weights="merged",
                                                                                n_threads=args.threads)}
            for dtype in {"F16", "Q8_0"} - {lora.MERGE_DTYPE}:
                rows[f"expert merged ({dtype})"] = experts.LlamaCppExpert(
                    str(lora.merge_gguf(adapter, name, dtype=dtype)), n_threads=args.threads)
            n_tok = sum(rows["base native"].count_tokens(q) for q in prompts)
            best = {label: np.full(len(prompts), np.inf) for label in rows}
            for e in rows.values():
                e.letter_logits(prompts[:3])  # warm-up: merge (cached), page in weights, allocate buffers
            for _ in range(args.rounds):  # prompt by prompt, row after row: the machine's load drifts
                for i, q in enumerate(prompts):
                    for label, e in rows.items():
                        t0 = time.perf_counter()
                        e.letter_logits([q])
                        best[label][i] = min(best[label][i], time.perf_counter() - t0)
            for e in rows.values():
                e.close()
        rate = {label: len(prompts) / t.sum() for label, t in best.items()}
        for label, r in rate.items():
            print(f"{name:24s} {label:28s} {r:6.2f} {r * n_tok / len(prompts):7.0f} "
                  f"{r / rate['base native']:8.2f} {r / rate['base F16']:7.2f}")
        merged = rate[f"expert merged ({lora.MERGE_DTYPE})"]
        print(f"{name:24s} merged expert / base: {merged / rate['base native']:.2f}x native, "
              f"{merged / rate['base F16']:.2f}x F16 (goal >= 0.9); merged / run-time adapter "
              f"{merged / rate['expert runtime-adapter']:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="MMLU test prompts, stratified by subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    p.add_argument("--formats", default="native,F16",
                   help="llama.cpp weight formats: native (the packaged file) and/or "
                        f"{', '.join(registry.QUANT_TYPES)} (re-encoded once into the cache)")
    p.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    p.add_argument("--choice", action="store_true", help="only the choice-path section (see above)")
    p.add_argument("--choice-n", type=int, default=40, help="questions for the choice-path section")
    p.add_argument("--experts", action="store_true", help="only the expert rows (see above)")
    p.add_argument("--expert-n", type=int, default=40, help="MMLU prompts for the expert rows")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the expert rows' adapter")
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj", help="its target modules")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (best kept)")
    args = p.parse_args(argv)
    if args.choice:
        return choice_section(args)
    if args.experts:
        return expert_section(args)

    sample = loaders.mmlu_sample(args.n, args.seed)
    prompts = [loaders.format_prompt(q) for q in sample]
    answers = np.array([q.answer for q in sample])
    print(f"{len(prompts)} MMLU test prompts, {args.threads} threads\n")
    header = f"{'model':24s} {'backend':22s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>7s} {'vs hf':>6s} " \
             f"{'acc':>6s} {'max|dp|':>8s} {'argmax=':>8s}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        hf = experts.TransformersExpert(name, n_threads=args.threads, batch_size=args.batch_size)
        n_tok = sum(hf.count_tokens(q) for q in prompts)
        hf_s, hf_p = timed(hf, prompts)
        hf.close()
        hf_rate = n_tok / hf_s
        print(f"{name:24s} {'transformers fp32':22s} {n_tok:7d} {hf_s:8.1f} {hf_rate:7.0f} {1:6.2f} "
              f"{(hf_p.argmax(1) == answers).mean():6.3f}")
        for fmt in args.formats.split(","):
            ll = experts.LlamaCppExpert(name, n_threads=args.threads, weights=fmt)
            ll_s, ll_p = timed(ll, prompts)
            ll.close()
            rate = n_tok / ll_s
            print(f"{name:24s} {'llama.cpp ' + fmt:22s} {n_tok:7d} {ll_s:8.1f} {rate:7.0f} {rate / hf_rate:6.2f} "
                  f"{(ll_p.argmax(1) == answers).mean():6.3f} {np.abs(ll_p - hf_p).max():8.3f} "
                  f"{(ll_p.argmax(1) == hf_p.argmax(1)).mean():8.3f}")


if __name__ == "__main__":
    main()
