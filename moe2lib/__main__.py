"""Command line of the MoE2 artifact: ``python -m moe2lib <command> --help``."""

from __future__ import annotations

import argparse
import sys

from .errors import Moe2Error


def _reproduce(args):
    from . import pipeline

    stages = args.stages.split(",") if args.stages else None
    pipeline.reproduce(args.profile, stages=stages, force=args.force, out=args.out)


def _stages(args):
    from . import pipeline

    for stage in pipeline.STAGES.values():
        print(f"{stage.name:14s} {stage.notebook:28s} {stage.doc}")


def _models(args):
    from . import models

    for name, spec in models.MODELS.items():
        status = ""
        if args.locate:
            try:
                status = f"  -> {models.locate(name)}"
            except Moe2Error as exc:
                status = f"  -> unavailable: {exc}"
        print(f"{name:24s} {spec.kind:9s} {spec.source.describe()}{status}")


def _data(args):
    from collections import Counter

    from . import data

    questions = data.load_mmlu(args.split, args.data_dir)
    counts = Counter(q.subject for q in questions)
    print(f"MMLU {args.split}: {len(questions)} questions in {len(counts)} subjects "
          f"(from {data.resolve_data_dir(args.data_dir)})")
    if args.verbose:
        for subject, n in sorted(counts.items()):
            print(f"  {subject:40s} {n}")


def _score(args):
    import numpy as np

    from . import data, experts, scoring

    questions = data.load_mmlu(args.split, args.data_dir)
    if args.n:
        questions = [questions[i] for i in data.stratified_sample(questions, args.n, args.seed)]
    options = {"weights": args.weights} if args.backend == "llama_cpp" else {}
    exps = [experts.make_expert(m, backend=args.backend, n_threads=args.threads, **options) for m in args.models]
    scores = scoring.score_questions(questions, exps, args.out)
    for name, acc in zip(scores.experts, scores.accuracy()):
        print(f"{name:30s} accuracy {acc:.3f} on {scores.n} questions")
    print(f"wrote {args.out}  probs {tuple(np.shape(scores.probs))}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moe2lib",
        description="MoE2 reproduction: run the paper's pipeline, or its pieces, on real models.",
        epilog="Start with `reproduce --profile smoke` (minutes) to see every stage run once.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reproduce", help="run the pipeline's notebooks in order with papermill",
                       description="Run every stage notebook with the profile's parameters. A stage whose "
                                   "parameters, notebook, library and inputs are unchanged is skipped.")
    r.add_argument("--profile", default="default",
                   help="smoke (CI, minutes), default (the reference run, <60 min on 2 cores), paper "
                        "(all 14,042 MMLU questions), or a path to a YAML file (default: %(default)s)")
    r.add_argument("--stages", help="comma-separated subset of stages (see `stages`)")
    r.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    r.add_argument("--out", help="folder for artifacts/ and figures/ (default: the repository for the "
                                 "default profile, runs/<profile>/ otherwise)")
    r.set_defaults(func=_reproduce)

    s = sub.add_parser("stages", help="list the pipeline's stages")
    s.set_defaults(func=_stages)

    m = sub.add_parser("models", help="list registered models and where they come from")
    m.add_argument("--locate", action="store_true", help="also resolve each to a local path (assembles Gemma once)")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="check the MMLU data directory")
    d.add_argument("--split", default="test", choices=["test", "val", "dev", "auxiliary_train"])
    d.add_argument("--data-dir", help="folder holding mmlu/ (default: $MOE2_DATA_DIR, ./data, ../shared/datasets)")
    d.add_argument("-v", "--verbose", action="store_true", help="per-subject counts")
    d.set_defaults(func=_data)

    c = sub.add_parser("score", help="score MMLU questions with models into a scores .npz",
                       description="Each model's distribution over the answer letters for each question.")
    c.add_argument("models", nargs="+", help="registered model names or GGUF paths")
    c.add_argument("--out", required=True, help="output .npz (resumes if interrupted)")
    c.add_argument("--split", default="test")
    c.add_argument("--n", type=int, default=0, help="stratified sample size (0: the whole split)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--backend", default="llama_cpp", help="llama_cpp or transformers")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--weights", default="native", help="llama.cpp weights: native (as packaged) or F16, Q8_0, "
                                                       "Q4_0, F32 (re-encoded once into the cache)")
    c.add_argument("--data-dir")
    c.set_defaults(func=_score)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Moe2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
