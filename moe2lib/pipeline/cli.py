"""Command line of the MoE2 artifact: ``python -m moe2lib <command> --help``."""

from __future__ import annotations

import argparse
import sys

from ..errors import Moe2Error, ResourceUnavailable


def _reproduce(args):
    from . import runner

    stages = args.stages.split(",") if args.stages else None
    runner.reproduce(args.profile, stages=stages, force=args.force, out=args.out)


def _figures(args):
    import time
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from . import config, report, runner

    t0 = time.perf_counter()
    cfg, _ = config.load_config(args.profile)
    root = Path(args.out) if args.out else runner.out_root(cfg.get("profile", Path(args.profile).stem))
    stages = args.stages.split(",") if args.stages else None
    done = report.regenerate(root / "artifacts", root / "figures", stages)
    print(f"{len(done.written)} files written in {time.perf_counter() - t0:.1f} s "
          f"({len(done.skipped)} stages skipped)")


def _evaluate(args):
    import json
    from pathlib import Path

    from ..analysis import evaluation
    from . import config, runner

    cfg, _ = config.load_config(args.profile)
    root = Path(args.out) if args.out else runner.out_root(cfg.get("profile", Path(args.profile).stem))
    bench = (cfg.get("benchmark") or {}).get("name", "mmlu")
    if args.bench != bench:
        raise ResourceUnavailable(f"the {args.profile} profile's run is on {bench!r}, not {args.bench!r}; "
                                  "pass --profile/--out of a run on that benchmark")
    metrics = evaluation.resplit(root / "artifacts", args.seed, n_bootstrap=args.n_bootstrap)
    keep = ("accuracy", "ci95", "differences", "improvement", "n_test", "n_train", "seed", "per_task")
    print(json.dumps({"bench": bench, **{k: metrics[k] for k in keep}}, indent=1))


def _ablate(args):
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from ..analysis import figures
    from ..infra.artifacts import read_json
    from . import ablation, runner

    cfg, _ = runner.load_config(args.profile)
    profile = cfg.get("profile", Path(args.profile).stem)
    root = runner.out_root(profile)
    out = Path(args.out) if args.out else root / "artifacts" / "ablation"
    ablation.run(args.profile, args.rows, out, only=args.row, workers=args.workers, n_threads=args.threads)
    target = Path(args.out) / "ablation.png" if args.out else root / "figures" / "ablation.png"
    figures.write_png(figures.ablation_rows(read_json(out / "ablation.json")["rows"]), target)  # rows run before too
    print(f"table: {out / 'table.csv'}; figure: {target}")


def _stages(args):
    from . import runner

    for stage in runner.STAGES.values():
        print(f"{stage.name:14s} {stage.notebook:28s} {stage.doc}")


def _models(args):
    from ..models import registry

    for name, spec in registry.MODELS.items():
        status = ""
        if args.locate:
            try:
                status = f"  -> {registry.locate(name)}"
            except Moe2Error as exc:
                status = f"  -> unavailable: {exc}"
        print(f"{name:24s} {spec.kind:9s} {spec.source.describe()}{status}")


def _data(args):
    from collections import Counter

    from ..data import loaders

    if args.action == "fetch":
        return _fetch(args)

    questions = loaders.load_mmlu(args.split, args.data_dir)
    counts = Counter(q.subject for q in questions)
    print(f"MMLU {args.split}: {len(questions)} questions in {len(counts)} subjects "
          f"(from {loaders.resolve_data_dir(args.data_dir)})")
    if args.verbose:
        for subject, n in sorted(counts.items()):
            print(f"  {subject:40s} {n}")


def _fetch(args):
    import os
    from pathlib import Path

    from ..data import fetch
    from . import runner

    cfg, _ = runner.load_config(args.profile)
    to = Path(args.to).expanduser()
    fetch.fetch(runner.profile_tasks(cfg), to, mirror=args.mirror)
    print(f"data folder ready: MOE2_DATA_DIR={os.path.abspath(to)}")


def _score(args):
    import numpy as np

    from ..data import loaders
    from ..models import experts, scoring

    questions = loaders.mmlu_sample(args.n, args.seed, args.split, args.data_dir)
    options = {"weights": args.weights} if args.backend == "llama_cpp" else {}
    exps = [experts.make_expert(m, backend=args.backend, n_threads=args.threads, **options) for m in args.models]
    scores = scoring.score_questions(questions, exps, args.out)
    for name, acc in zip(scores.experts, scores.accuracy()):
        print(f"{name:30s} accuracy {acc:.3f} on {scores.n} questions")
    print(f"wrote {args.out}  probs {tuple(np.shape(scores.probs))}")


def _serve_experts(args):
    import signal
    import time

    from ..serve import servers

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the servers as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    options = dict(n_threads=args.threads, n_ctx=args.n_ctx)
    models = args.models.split(",") if args.models else None
    specs = servers.default_specs(args.experts, models, **options)
    with servers.ServerPool(specs, base_port=args.base_port, host=args.host) as pool:
        for name, url in pool.urls.items():
            print(f"{name:28s} {url}", flush=True)
        print("chat templates: " + ",".join(f"{s.spec.name}={s.spec.model_path()}" for s in pool.servers), flush=True)
        print("experts: " + ",".join(f"{n}={u}" for n, u in pool.urls.items()), flush=True)
        print("serving; Ctrl-C stops all servers", flush=True)
        try:
            while all(s.alive() for s in pool.servers):
                time.sleep(1)
        except KeyboardInterrupt:
            return
        dead = [f"{s.spec.name} (log: {s.log_path})" for s in pool.servers if not s.alive()]
        raise ResourceUnavailable(f"expert server exited: {', '.join(dead)}; the others are stopped")


def _coordinator(args):
    from ..serve import coordinator as co

    gate = co.gate_from_gating(args.gating) if args.gating else None
    clients = co.clients_from_urls(args.experts, args.api, getattr(args, "chat_templates", None))
    return co.Coordinator(clients, gate, top_k=args.top_k, top_n=args.top_n,
                          remainder=args.remainder, prefix=not args.exact, timeout=args.timeout,
                          costs=args.costs, deadline_s=args.deadline, energy_j=args.energy)


def _generate(args):
    import asyncio

    coord = _coordinator(args)
    out: dict = {}

    async def run():
        async for step in coord.astream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                        seed=args.seed, stop=args.stop or (), result=out):
            print(step.text, end="", flush=True)
            if args.verbose:
                print(f"  [{','.join(step.experts)}]", end="", file=sys.stderr, flush=True)

    asyncio.run(run())
    gen = out["generation"]
    print()
    print(f"[{gen.finish_reason}; {len(gen.steps)} steps; delay {gen.delay_s:.2f} s; energy {gen.energy_j:.3g} J "
          f"({gen.energy_source}); experts {gen.selected}; dropped {gen.dropped or 'none'}]", file=sys.stderr)
    if args.trace:
        from ..infra.artifacts import write_json
        write_json(args.trace, gen.to_dict())


def _serve(args):
    import uvicorn

    from ..serve.endpoint import Limits, make_app

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable beyond this machine", file=sys.stderr)
    app = make_app(_coordinator(args), Limits(args.max_prompt_chars, args.max_tokens_limit, args.concurrency))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _fusion_options(p):
    p.add_argument("--experts", required=True, help="comma-separated expert server URLs, optionally name=URL")
    p.add_argument("--api", default="openai", help="server API: openai (llama-cpp-python, vLLM /v1/completions) "
                                                   "or llama-server (llama.cpp /completion)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k experts with the largest gating values")
    p.add_argument("--top-n", type=int, default=10, help="tokens asked from each expert per step")
    p.add_argument("--remainder", default="drop", choices=["drop", "uniform"],
                   help="mass outside an expert's top-n: renormalise it away, or spread it over the vocabulary")
    p.add_argument("--exact", action="store_true", help="match candidates by exact text only (no prefix credit)")
    p.add_argument("--gating", help="gating.safetensors of the gating stage (default: uniform weights)")
    p.add_argument("--costs", help="profiles.json with per-expert per-token delay/energy estimates")
    p.add_argument("--deadline", type=float, help="delay budget per request, s (eq. 9)")
    p.add_argument("--energy", type=float, help="energy budget per request, J (eq. 12)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")


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
                   help="smoke (CI, minutes), default (the reference run; its time on 2 cores is in the README), "
                        "paper (all 14,042 MMLU questions), or a path to a YAML file (default: %(default)s)")
    r.add_argument("--stages", help="comma-separated subset of stages (see `stages`)")
    r.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    r.add_argument("--out", help="folder for artifacts/ and figures/ (default: the repository for the "
                                 "default profile, runs/<profile>/ otherwise)")
    r.set_defaults(func=_reproduce)

    f = sub.add_parser("figures", help="redraw every figure and table from the stored artifacts (no model runs)",
                       description="Redraw each stage's figures into figures/ and rewrite the tables stage's CSV "
                                   "and Markdown files, from <out>/artifacts/ alone, with the library functions "
                                   "the notebooks call: no model, server or training, seconds for a whole run. "
                                   "A stage whose artifacts are absent or unreadable is skipped with one line.")
    f.add_argument("--profile", default="default",
                   help="whose artifacts: smoke, default, paper, or a YAML file as for `reproduce` "
                        "(default: %(default)s)")
    f.add_argument("--out", help="folder holding the run's artifacts/ and figures/, as given to `reproduce --out` "
                                 "(default: the repository for the default profile, runs/<profile>/ otherwise)")
    f.add_argument("--stages", help="comma-separated subset of stages (see `stages`), or `ablation` for the "
                                    "ablation's figure (default: all, the ablation's when it has run)")
    f.set_defaults(func=_figures)

    ev = sub.add_parser("evaluate", help="re-split a finished run's questions with a new seed, retrain the gating, "
                                         "print Fig. 3 as JSON (no model runs)",
                        description="Draw a new gating-training/test split (same sizes, in proportion per task) "
                                    "from the run's committed scores and embeddings, retrain the gating with the "
                                    "run's parameters and print the accuracies (keys as in gating/metrics.json), "
                                    "the paired differences MoE2 - baseline with 95%% bootstrap intervals, and "
                                    "n_test. Seconds; a check that the result is not one lucky split.")
    ev.add_argument("--bench", default="edge-mix", help="benchmark the run was made on (default: %(default)s)")
    ev.add_argument("--seed", type=int, required=True, help="seed of the new split and of the gating")
    ev.add_argument("--profile", default="default", help="whose run (default: %(default)s)")
    ev.add_argument("--out", help="folder holding the run's artifacts/ (as for `figures`)")
    ev.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples (default: the run's)")
    ev.set_defaults(func=_evaluate)

    ab = sub.add_parser("ablate", help="how the experts are made, one change at a time, measured on validation",
                        description="Train the experts once per row of the ablation file (each row changes one "
                                    "clustering or LoRA setting of the profile), score them and their base models "
                                    "on the validation questions held out of the expert-training split, and write "
                                    "own-cluster gain, own-minus-other gain and MoE2 - Single Agent per row "
                                    "(table.csv, ablation.json, a figure). No gating-training or test question "
                                    "is read. Resumable: a row's finished adapters and scores are reused. About "
                                    "20-30 minutes a row on the default profile on 2 cores.")
    ab.add_argument("--profile", default="default", help="whose settings and questions (default: %(default)s)")
    ab.add_argument("--rows", default=str(_configs_dir() / "ablation.yaml"),
                    help="YAML file with the rows (default: %(default)s)")
    ab.add_argument("--row", action="append", help="run only this row (by name; repeatable)")
    ab.add_argument("--out", help="folder for the rows' adapters, scores and the table (default: "
                                  "<run>/artifacts/ablation, the figure in <run>/figures/ablation.png)")
    ab.add_argument("--workers", type=int, default=2, help="models trained or scored at once (default: 2)")
    ab.add_argument("--threads", type=int, default=2, help="threads in all (default: 2)")
    ab.set_defaults(func=_ablate)

    s = sub.add_parser("stages", help="list the pipeline's stages")
    s.set_defaults(func=_stages)

    m = sub.add_parser("models", help="list registered models and where they come from")
    m.add_argument("--locate", action="store_true", help="also resolve each to a local path (assembles Gemma once)")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="check the MMLU data directory, or fetch a profile's data (`data fetch`)",
                       description="`data` (or `data check`) counts an MMLU split's questions. `data fetch` "
                                   "downloads the files the profile's tasks need from their upstream addresses, "
                                   "checks each against the sha256 manifest in the package and lays them out "
                                   "as the data folder (resuming an interrupted download).")
    d.add_argument("action", nargs="?", default="check", choices=["check", "fetch"],
                   help="check (default) or fetch")
    d.add_argument("--split", default="test", choices=["test", "val", "dev", "auxiliary_train"],
                   help="check: the MMLU split to count")
    d.add_argument("--data-dir", help="check: folder holding mmlu/ (default: $MOE2_DATA_DIR, ./data, "
                                      "../shared/datasets)")
    d.add_argument("-v", "--verbose", action="store_true", help="check: per-subject counts")
    d.add_argument("--profile", default="default",
                   help="fetch: whose tasks (smoke, default, paper or a YAML file; default: %(default)s)")
    d.add_argument("--to", default="data", help="fetch: the data folder to fill (default: ./data)")
    d.add_argument("--mirror", default=None,
                   help="fetch: fetch URL/<host>/<path> instead of https://<host>/<path> (a URL or a local "
                        "folder; default: $MOE2_DATA_MIRROR, else the upstream addresses)")
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

    se = sub.add_parser("serve-experts",
                        help="start expert servers (llama-cpp-python), on loopback unless --host says otherwise",
                        description="Start one llama.cpp server per expert (adapters from experts.json when it "
                                    "exists, else the packaged base models) and print their URLs.")
    se.add_argument("--experts", default="artifacts/experts/experts.json",
                    help="experts registry (default: %(default)s)")
    se.add_argument("--models", help="comma-separated base models instead of the registry")
    se.add_argument("--base-port", type=int, default=8101, help="first port; the next experts take the next ones")
    se.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: %(default)s; another address makes the servers, which have "
                         "no authentication, reachable from other machines)")
    se.add_argument("--threads", type=int, default=1, help="threads per server")
    se.add_argument("--n-ctx", type=int, default=512, help="context size per server")
    se.set_defaults(func=_serve_experts)

    g = sub.add_parser("generate", help="fused generation across expert servers (prints tokens as they come)")
    g.add_argument("prompt")
    _fusion_options(g)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: argmax")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--trace", help="write the step-by-step trace to this JSON file")
    g.add_argument("-v", "--verbose", action="store_true", help="show which experts took part in each step")
    g.set_defaults(func=_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible endpoint of the coordinator "
                                      "(/v1/completions, /v1/chat/completions)")
    _fusion_options(sv)
    sv.add_argument("--chat-templates", help="each expert's model, whose GGUF chat template renders chat requests "
                                             "for it: name=MODEL_OR_GGUF,... (serve-experts prints this line); "
                                             "experts not named get a plain User:/Assistant: transcript")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8100)
    sv.add_argument("--max-prompt-chars", type=int, default=4000)
    sv.add_argument("--max-tokens-limit", type=int, default=256)
    sv.add_argument("--concurrency", type=int, default=2, help="requests served at once (more: HTTP 429)")
    sv.set_defaults(func=_serve)
    return p


def _configs_dir():
    """The repository's configs/ folder (without importing the pipeline's runner at parse time)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "configs"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Moe2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m moe2lib.pipeline.cli
    sys.exit(main())
