"""Scoring throughput: llama.cpp against transformers fp32 on the same MMLU prompts.

    python benchmarks/bench_scoring.py [--n 200] [--threads 2] [--formats native,F16]

For each packaged base model it times the answer-letter scoring of the same stratified MMLU
prompts (last-position logits only) with the llama.cpp backend — on the packaged GGUF ("native")
and on copies re-encoded by llama.cpp's quantizer — and with the transformers backend (fp32,
batched with left padding), and prints prompt tokens/s, the llama.cpp/transformers ratio and how
closely the two backends agree (max |Δp| over the answer letters, argmax agreement).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moe2lib import data, experts, models


def timed(expert, prompts):
    expert.letter_logits(prompts[:3])  # warm-up: page in weights, allocate buffers
    t0 = time.perf_counter()
    probs = expert.choice_probs(prompts)
    return time.perf_counter() - t0, probs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="MMLU test prompts, stratified by subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    p.add_argument("--formats", default="native,F16",
                   help="llama.cpp weight formats: native (the packaged file) and/or "
                        f"{', '.join(models.QUANT_TYPES)} (re-encoded once into the cache)")
    p.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    args = p.parse_args(argv)

    questions = data.load_mmlu("test")
    sample = [questions[i] for i in data.stratified_sample(questions, args.n, args.seed)]
    prompts = [data.format_prompt(q) for q in sample]
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
