"""Per-token latency of fused generation with 1, 2 and 3 expert servers vs the slowest expert alone.

    .venv/bin/python benchmarks/bench_fusion.py [--tokens 12] [--repeats 3] [--out bench_fusion.json]

Servers: SmolLM2 (Q4_1), SmolLM2 (Q8_0), Gemma-3-270M (Q4_K_M), one thread each. "Alone" is a plain
HTTP loop against one server (same requests, no fusion); "fused-m" is the coordinator over the first m
servers (Gemma, the slowest, first). Configurations alternate round-robin so that load drift from other
users of the machine hits them alike. The target is fused <= 1.15 x slowest alone: a token-level
ensemble waits for its slowest member (eq. (7)), not for the sum. Two runs: servers unpinned, and each
pinned to a core with taskset (Gemma alone on core 0, the two SmolLM2 sharing core 1 on 2 cores). On 2
cores three one-thread servers compete for CPU, so fused-3 measures contention as much as fusion; the
ratio that isolates the coordinator's overhead is fused-1 / alone:gemma (same server, same requests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx

from moe2lib.models import registry
from moe2lib.serve import servers
from moe2lib.serve.coordinator import APIS, Coordinator

PROMPT = "The history of the printing press begins"


def alone(client, tokens: int, top_n: int) -> list[float]:
    """Per-token seconds of one expert generating greedily by itself, one HTTP request per token."""
    api, text, out = APIS[client.api], PROMPT, []
    with httpx.Client() as http:
        for _ in range(tokens):
            t = time.perf_counter()
            r = http.post(client.url + api.path, json=api.payload(text, top_n, None, client.end_ids), timeout=60)
            out.append(time.perf_counter() - t)
            top = api.parse(r.json())
            text += max(top, key=top.get) or " "
    return out[1:]  # the first token includes the prompt


def fused(clients, tokens: int, top_n: int) -> list[float]:
    gen = Coordinator(clients, top_n=top_n, timeout=60).generate(PROMPT, max_tokens=tokens)
    return [s.latency_s for s in gen.steps[1:]]


def run(pin: bool, tokens: int, repeats: int, top_n: int) -> dict:
    ncpu = len(os.sched_getaffinity(0))
    cpus = {"gemma": 0, "smol": 1 % ncpu, "smol-q8": 1 % ncpu} if pin else {}
    specs = [servers.ServerSpec("gemma", "gemma3-270m", cpu=cpus.get("gemma")),
             servers.ServerSpec("smol", "smollm2-135m-instruct", cpu=cpus.get("smol")),
             servers.ServerSpec("smol-q8", str(registry.requantized("smollm2-135m-instruct", "Q8_0")),
                                cpu=cpus.get("smol-q8"))]
    res: dict = {"pinned": cpus or None}
    with servers.ServerPool(specs) as pool:
        cl = pool.clients()
        for c in cl:  # warm up each server once
            alone(c, 2, top_n)
        configs = {f"alone:{c.name}": (lambda c=c: alone(c, tokens, top_n)) for c in cl}
        configs.update({f"fused-{m}": (lambda m=m: fused(cl[:m], tokens, top_n)) for m in (1, 2, 3)})
        keys = list(configs)
        for r in range(repeats):  # round-robin, rotated: the other users' load drifts over minutes
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                res.setdefault(k, []).extend(configs[k]())
    slowest = max(statistics.median(v) for k, v in res.items() if k.startswith("alone:"))
    summary = {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v), "n": len(v),
                   "ratio_to_slowest_alone": statistics.median(v) / slowest}
               for k, v in res.items() if k != "pinned"}
    return {"pinned": res["pinned"], "per_token": summary}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    out = {"cpus": len(os.sched_getaffinity(0)), "tokens": args.tokens, "top_n": args.top_n, "runs": {}}
    for pin in (False, True):
        key = "pinned" if pin else "unpinned"
        r = out["runs"][key] = run(pin, args.tokens, args.repeats, args.top_n)
        print(f"\n{key} {r['pinned'] or ''}")
        print(f"  {'config':14s} {'median ms/token':>16s} {'mean':>8s} {'ratio to slowest alone':>24s}")
        for k, v in r["per_token"].items():
            print(f"  {k:14s} {1000 * v['median_s']:16.1f} {1000 * v['mean_s']:8.1f} "
                  f"{v['ratio_to_slowest_alone']:24.2f}")
    if args.out:
        from moe2lib.infra.artifacts import write_json
        write_json(args.out, out)


if __name__ == "__main__":
    main()
