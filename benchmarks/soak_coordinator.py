"""Load soak of the coordinator's OpenAI-compatible endpoint over real llama.cpp expert servers.

Starts 3 expert servers (llama-cpp-python, the packaged SmolLM2 twice and Gemma, as in the tests), the endpoint
as a separate process (``python -m moe2lib serve``, the way it is deployed), then keeps ``--concurrency``
generation requests in flight (each client sends its next request when the last one ends; half of them
stream by default) for ``--duration`` seconds, waits for the requests in flight, and prints: requests/s,
p50/p95 latency, errors by kind, and, at the start (after one warm-up request) and at the end, each process's
memory (RSS), open file descriptors and TCP connections, and this process's children. Leaks show as
connections, descriptors or children at the end that were not there at the start.

    nice -n 19 python benchmarks/soak_coordinator.py --duration 180      # the full soak (≈ 5 min with start-up)
    nice -n 19 python benchmarks/soak_coordinator.py --duration 15 --max-tokens 2   # a quick check

Exit status 0, or 1 with ``--strict`` when a request failed (other than 429) or something leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe2lib.serve import servers  # noqa: E402

TOPICS = ["the water cycle", "prime numbers", "the French revolution", "photosynthesis", "binary search",
          "the moon landing", "volcanoes", "supply and demand", "the human heart", "Shakespeare"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="soak_coordinator.py",
        description="Hold N concurrent generation requests against the MoE2 coordinator endpoint (3 local "
                    "llama.cpp expert servers behind it) for a while; report throughput, latency, errors and "
                    "resource use at the start vs the end (memory, descriptors, connections, child processes).",
        epilog="Everything binds to 127.0.0.1 and is stopped at the end, also on Ctrl-C. Run it niced on a "
               "shared machine: the expert servers and the endpoint inherit the niceness.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (new requests are sent until then)")
    p.add_argument("--concurrency", type=int, default=20, help="requests kept in flight (one per client task)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request")
    p.add_argument("--stream", choices=["none", "half", "all"], default="half",
                   help="which clients ask for a server-sent-event stream")
    p.add_argument("--chat-fraction", type=float, default=0.25,
                   help="share of requests sent to /v1/chat/completions instead of /v1/completions")
    p.add_argument("--drain", type=float, default=180.0,
                   help="seconds to wait after --duration for requests in flight; the rest are cut (counted)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="client-side timeout per request, s")
    p.add_argument("--endpoint-concurrency", type=int, default=None,
                   help="the endpoint's own limit of requests in flight, beyond which it answers 429 "
                        "(default: --concurrency, so that none is refused)")
    p.add_argument("--expert-timeout", type=float, default=120.0,
                   help="the coordinator's per-expert, per-step timeout (--timeout of `serve`), s; the servers "
                        "answer one request at a time, so a step waits behind the other requests' steps")
    p.add_argument("--deadline", type=float, default=None, help="the coordinator's delay budget per request, s")
    p.add_argument("--models", default="smollm2-135m-instruct,smollm2-135m-instruct,gemma3-270m",
                   help="comma-separated expert models (registered names or GGUF paths), one server each")
    p.add_argument("--threads", type=int, default=1, help="threads per expert server")
    p.add_argument("--port", type=int, default=None, help="the endpoint's port (default: a free one)")
    p.add_argument("--sample-every", type=float, default=10.0,
                   help="seconds between memory samples of each process (the timeline goes to --json)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--strict", action="store_true", help="exit 1 on any failed request or leak")
    args = p.parse_args(argv)
    for name in ("duration", "concurrency", "max_tokens", "request_timeout", "expert_timeout", "sample_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.chat_fraction <= 1:
        p.error("--chat-fraction must be in [0, 1]")
    args.endpoint_concurrency = args.endpoint_concurrency or args.concurrency
    return args


# --------------------------------------------------------------------------- resources

def snapshot(procs: dict[str, psutil.Process]) -> dict:
    """RSS, descriptors and TCP connections (by state) of each named process, and this process's children."""
    out = {}
    for name, pr in procs.items():
        try:
            with pr.oneshot():
                conns = pr.net_connections(kind="tcp")
                states: dict[str, int] = {}
                for c in conns:
                    states[c.status] = states.get(c.status, 0) + 1
                out[name] = {"rss_mb": pr.memory_info().rss / 2**20, "fds": pr.num_fds(), "tcp": len(conns),
                             "tcp_states": states, "threads": pr.num_threads()}
        except psutil.Error as exc:
            out[name] = {"gone": f"{type(exc).__name__}"}
    me = psutil.Process()
    kids = me.children(recursive=True)
    out["_self"] = {"children": len(kids), "child_pids": sorted(k.pid for k in kids),
                    "tcp": len(me.net_connections(kind="tcp")), "fds": me.num_fds(),
                    "rss_mb": me.memory_info().rss / 2**20}
    return out


def quiet(procs: dict[str, psutil.Process], wait: float = 10.0) -> None:
    """Wait until no process holds a connection other than its listening socket (the start's baseline)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        if all(c.status == psutil.CONN_LISTEN for pr in procs.values() for c in pr.net_connections(kind="tcp")):
            return
        time.sleep(0.5)


def settle(procs: dict[str, psutil.Process], baseline: dict, wait: float = 30.0) -> None:
    """Give closing connections a moment (TIME_WAIT belongs to no process; CLOSE_WAIT and ESTABLISHED do)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        now = snapshot(procs)
        if all(now[n].get("tcp", 0) <= baseline[n].get("tcp", 0) for n in procs):
            return
        time.sleep(1.0)


# --------------------------------------------------------------------------- load

class Stats:
    def __init__(self):
        self.records: list[dict] = []

    def add(self, **r):
        self.records.append(r)


def failed(r: httpx.Response, t0: float, stream: bool) -> dict:
    """A non-200 answer as a record: its status and the endpoint's error message (and Retry-After)."""
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = r.text
    try:
        retry = float(r.headers.get("retry-after", ""))
    except ValueError:
        retry = None
    return dict(ok=False, kind=f"http {r.status_code}: {msg[:60]}", latency=time.monotonic() - t0, stream=stream,
                retry_after=retry)


async def one_request(client: httpx.AsyncClient, url: str, i: int, args, stream: bool, chat: bool) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    text = f"Request {i}. Write one sentence about {topic}."
    body = {"max_tokens": args.max_tokens, "stream": stream, "temperature": 0.0}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        route = "/v1/chat/completions"
    else:
        body["prompt"] = f"{text}\nAnswer:"
        route = "/v1/completions"
    t0 = time.monotonic()
    first = None
    try:
        if stream:
            async with client.stream("POST", url + route, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return failed(r, t0, True)
                error, done, tokens = None, False, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        error = ev["error"].get("message", "?")
                    elif ev["choices"][0].get("finish_reason") is None:
                        tokens += 1
                        first = first or time.monotonic() - t0
                if error or not done:
                    return dict(ok=False, kind=f"stream error: {(error or 'no [DONE]')[:60]}",
                                latency=time.monotonic() - t0, stream=True)
                return dict(ok=True, latency=time.monotonic() - t0, ttft=first, tokens=tokens, stream=True)
        r = await client.post(url + route, json=body)
        if r.status_code != 200:
            return failed(r, t0, False)
        js = r.json()
        return dict(ok=True, latency=time.monotonic() - t0, tokens=js["usage"]["completion_tokens"], stream=False,
                    finish=js["choices"][0]["finish_reason"])
    except Exception as exc:  # noqa: BLE001 - a transport error or an unreadable answer is a failed request
        return dict(ok=False, kind=f"client {type(exc).__name__}", latency=time.monotonic() - t0, stream=stream)


async def sample_rss(procs: dict[str, psutil.Process], every: float, t_start: float, out: list) -> None:
    """Every ``every`` seconds: (t, {process: RSS MB}) — growth that goes on after warm-up is a leak."""
    while True:
        row = {}
        for name, pr in procs.items():
            try:
                row[name] = pr.memory_info().rss / 2**20
            except psutil.Error:
                row[name] = None
        out.append((time.monotonic() - t_start, row))
        await asyncio.sleep(every)


async def load(url: str, args, stats: Stats, procs: dict[str, psutil.Process], timeline: list) -> dict:
    """``--concurrency`` clients, each one request in flight, until the duration ends; then wait (drain)."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    counter = iter(range(10**9))
    t_start = time.monotonic()
    t_stop = t_start + args.duration

    async def worker(w: int, client: httpx.AsyncClient):
        stream = args.stream == "all" or (args.stream == "half" and w % 2 == 0)
        while time.monotonic() < t_stop:
            i = next(counter)
            chat = (i * 37) % 100 < round(100 * args.chat_fraction)  # spread over the clients, deterministic
            rec = await one_request(client, url, i, args, stream, chat)
            rec["end"] = time.monotonic() - t_start
            stats.add(**rec)
            if rec.get("kind", "").startswith("http 429"):  # refused: back off as the endpoint asks
                await asyncio.sleep(rec.get("retry_after") or 1.0)

    sampler = asyncio.create_task(sample_rss(procs, args.sample_every, t_start, timeline))
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
        tasks = [asyncio.create_task(worker(w, client)) for w in range(args.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.drain)
        for t in pending:
            t.cancel()
        sampler.cancel()
        await asyncio.gather(*pending, sampler, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    return {"load_s": args.duration, "elapsed_s": time.monotonic() - t_start, "cut": len(pending)}


# --------------------------------------------------------------------------- report

def summarise(stats: Stats, timing: dict, start: dict, end: dict, procs, args, timeline) -> dict:
    recs = stats.records
    ok = [r for r in recs if r["ok"]]
    errors: dict[str, int] = {}
    for r in recs:
        if not r["ok"]:
            errors[r["kind"]] = errors.get(r["kind"], 0) + 1
    rejected = sum(v for k, v in errors.items() if k.startswith("http 429"))
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft"] for r in ok if r.get("ttft") is not None]) if ok else np.array([])
    in_window = [r for r in ok if r["end"] <= timing["load_s"]]
    leaks = []
    for name in procs:
        s, e = start[name], end[name]
        if "gone" in e:
            leaks.append(f"{name} exited during the soak")
            continue
        for key in ("tcp", "fds"):
            if e[key] > s[key]:
                leaks.append(f"{name}: {key} {s[key]} -> {e[key]}")
    if end["_self"]["children"] != start["_self"]["children"]:
        leaks.append(f"children {start['_self']['children']} -> {end['_self']['children']}")
    if end["_self"]["tcp"] > start["_self"]["tcp"]:
        leaks.append(f"this process's tcp {start['_self']['tcp']} -> {end['_self']['tcp']}")
    return {
        "args": vars(args), "requests": len(recs), "ok": len(ok), "errors": sum(errors.values()) - rejected,
        "rejected_429": rejected, "errors_by_kind": errors, "cut_at_end": timing["cut"],
        "requests_per_s": len(in_window) / timing["load_s"],
        "requests_per_s_incl_drain": len(ok) / timing["elapsed_s"],
        "tokens_per_s": sum(r.get("tokens", 0) for r in ok) / timing["elapsed_s"],
        "latency_s": {"p50": float(np.nanpercentile(lat, 50)), "p95": float(np.nanpercentile(lat, 95)),
                      "max": float(np.nanmax(lat))},
        "ttft_s_stream": {"p50": float(np.percentile(ttft, 50)), "p95": float(np.percentile(ttft, 95))}
        if ttft.size else None,
        "elapsed_s": timing["elapsed_s"], "start": start, "end": end, "leaks": leaks,
        "rss_max_mb": {n: max((row[n] for _, row in timeline if row.get(n) is not None), default=None)
                       for n in procs},
        "rss_timeline": [{"t": round(t, 1), **{n: (None if v is None else round(v, 1)) for n, v in row.items()}}
                         for t, row in timeline],
    }


def print_report(res: dict, procs) -> None:
    a = res["args"]
    drain = res["elapsed_s"] - a["duration"]
    print(f"\n== soak: {a['concurrency']} concurrent, {a['duration']:.0f} s load (+{drain:.0f} s drain), "
          f"max_tokens {a['max_tokens']}, stream {a['stream']}")
    print(f"requests      {res['requests']} sent, {res['ok']} ok, {res['errors']} errors, "
          f"{res['rejected_429']} rejected (429), {res['cut_at_end']} cut at the end")
    for k, v in sorted(res["errors_by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:5d} x {k}")
    print(f"throughput    {res['requests_per_s']:.3f} requests/s in the load window "
          f"({res['requests_per_s_incl_drain']:.3f} incl. drain), {res['tokens_per_s']:.2f} tokens/s")
    lat = res["latency_s"]
    print(f"latency       p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s")
    if res["ttft_s_stream"]:
        ttft = res["ttft_s_stream"]
        print(f"first token   p50 {ttft['p50']:.2f} s, p95 {ttft['p95']:.2f} s (streams)")
    print(f"{'process':32s} {'RSS MB start':>12s} {'max':>7s} {'end':>7s} {'fds start':>10s} {'end':>4s} "
          f"{'tcp start':>10s} {'end':>4s}")
    for name in list(procs) + ["_self"]:
        s, e = res["start"][name], res["end"][name]
        if "gone" in e:
            print(f"{name:32s} gone at the end ({e['gone']})")
            continue
        top = max(v for v in (res["rss_max_mb"].get(name), s["rss_mb"], e["rss_mb"]) if v is not None)
        print(f"{name:32s} {s['rss_mb']:12.1f} {top:7.1f} {e['rss_mb']:7.1f} {s['fds']:10d} {e['fds']:4d} "
              f"{s['tcp']:10d} {e['tcp']:4d}")
    kids = res["start"]["_self"]["children"], res["end"]["_self"]["children"]
    print(f"child processes: {kids[0]} at the start, {kids[1]} at the end")
    print("leaks: " + ("none" if not res["leaks"] else "; ".join(res["leaks"])))


# --------------------------------------------------------------------------- main

def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the endpoint exited ({proc.returncode}); log {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the endpoint did not answer within {timeout:.0f} s; log {log}")


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = servers.specs_from_models([m.strip() for m in args.models.split(",") if m.strip()],
                                      n_threads=args.threads)
    logdir = Path(tempfile.mkdtemp(prefix="moe2-soak-"))
    pool = servers.ServerPool(specs, log_dir=logdir)
    api = None
    t0 = time.monotonic()
    try:
        print(f"starting {len(specs)} expert servers: {', '.join(s.name for s in specs)} (logs: {logdir})",
              flush=True)
        pool.start()
        port = args.port or servers.free_port()
        url = f"http://127.0.0.1:{port}"
        experts = ",".join(f"{n}={u}" for n, u in pool.urls.items())
        cmd = [sys.executable, "-m", "moe2lib", "serve", "--experts", experts, "--port", str(port),
               "--concurrency", str(args.endpoint_concurrency), "--max-tokens-limit", str(args.max_tokens),
               "--timeout", str(args.expert_timeout),
               "--chat-templates", ",".join(f"{s.name}={s.model_path()}" for s in specs)]
        if args.deadline:
            cmd += ["--deadline", str(args.deadline)]
        api_log = logdir / "endpoint.log"
        with open(api_log, "wb") as fh:
            api = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        wait_http(url, api, api_log)
        print(f"endpoint {url} ready after {time.monotonic() - t0:.0f} s; warm-up request", flush=True)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 1}, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up failed: HTTP {r.status_code} {r.text[:300]}")
        procs = {"endpoint": psutil.Process(api.pid)}
        procs.update({f"expert {s.spec.name}": psutil.Process(s.proc.pid) for s in pool.servers})
        quiet(procs)
        start = snapshot(procs)
        print(f"load: {args.concurrency} clients for {args.duration:.0f} s", flush=True)
        stats, timeline = Stats(), []
        timing = asyncio.run(load(url, args, stats, procs, timeline))
        settle(procs, start, 90.0 if timing["cut"] else 20.0)  # cut non-stream requests still run in the endpoint
        end = snapshot(procs)
        res = summarise(stats, timing, start, end, procs, args, timeline)
        print_report(res, procs)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
        bad = res["errors"] > 0 or bool(res["leaks"])
        return 1 if (args.strict and bad) else 0
    finally:
        if api is not None and api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(api.pid, signal.SIGKILL)
                api.wait()
        pool.stop()


if __name__ == "__main__":
    sys.exit(main())
