"""The coordinator against real llama-cpp-python servers: 2× SmolLM2 + Gemma (two tokenizers).

One server pool per module (n_threads=1 each, free loopback ports); every process is checked to be gone
at the end. The fused output is compared with (29) computed in-process from the same models' logits.
"""

import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moe2lib.core import fusion
from moe2lib.errors import InputError
from moe2lib.serve import servers
from moe2lib.serve.coordinator import (
    APIS,
    AllExpertsFailed,
    Coordinator,
    ExpertClient,
    ExpertCost,
    ExpertFailed,
    OpenAICompletions,
    clients_from_urls,
)
from moe2lib.serve.endpoint import Limits

pytestmark = pytest.mark.slow
PROMPT = "Question: What is the capital of France?\nAnswer:"
TOP_N = 8


def clients(pool, names=("smol", "smol-b", "gemma")):
    return pool.clients(names)


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP port is listening on, from /proc/net/tcp{,6} (what the kernel really bound)."""
    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                if width == 8:
                    out.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    out.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return out


class Silent:
    """A real TCP server that accepts connections and never answers (a hung expert)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


class Trickle(Silent):
    """A real HTTP server that sends its headers at once and then one body byte every 0.2 s, for a minute:
    httpx's timeouts are per read, so they never fire on it; only a wall-clock bound ends the wait."""

    def __init__(self):
        super().__init__()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(300):
                    if self.stop.wait(0.2):
                        return
                    conn.sendall(b" ")
            except OSError:
                return

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)
        super().__exit__()


class Reference:
    """Each server's model in-process: the top-n strings of the log-softmax of the last logits, as the server."""

    def __init__(self, pool):
        import llama_cpp

        self.llms = {}
        for s in pool.servers:
            self.llms[s.spec.name] = llama_cpp.Llama(str(s.spec.model_path()), n_ctx=512, n_threads=1,
                                                     lora_path=s.spec.adapter, verbose=False)

    def top(self, name, text, n=TOP_N):
        import llama_cpp
        from llama_cpp import Llama

        llm = self.llms[name]
        bos = [llm.token_bos()] if llm._model.add_bos_token() else []
        ids = bos + llm.tokenize(text.encode(), add_bos=False, special=True)
        # like the server: keep the cached prefix and decode only the new tokens (same kernels, same numbers)
        keep = min(Llama.longest_token_prefix(llm._input_ids.tolist(), ids), len(ids) - 1)
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        lp = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))
        top = {}
        for i in np.argsort(-lp, kind="stable")[:n]:
            top[llm.detokenize([int(i)]).decode("utf-8", errors="ignore")] = float(lp[i])
        return {s: float(np.exp(v)) for s, v in top.items()}

    def close(self):
        for llm in self.llms.values():
            llm.close()


def test_fused_tokens_equal_eq29_computed_in_process(pool):
    gate = lambda prompt: np.array([0.2, 0.3, 0.5])  # noqa: E731
    coord = Coordinator(clients(pool), gate, top_n=TOP_N, prefix=False)
    gen = coord.generate(PROMPT, max_tokens=6)
    assert gen.finish_reason in ("length", "stop") and len(gen.steps) >= 1
    assert gen.selected == ["smol", "smol-b", "gemma"] and not gen.dropped
    ref = Reference(pool)
    try:
        text = PROMPT
        for step in gen.steps:
            assert step.experts == ["smol", "smol-b", "gemma"]
            assert step.weights == pytest.approx({"smol": 0.2, "smol-b": 0.3, "gemma": 0.5})
            tops = {n: ref.top(n, text) for n in step.experts}
            for n in step.experts:  # the server's top-n = log-softmax of the raw logits over the full vocabulary
                got = dict(step.expert_top[n])
                assert set(got) == set(tops[n]), n
                assert [got[s] for s in tops[n]] == pytest.approx(list(tops[n].values()), abs=2e-3), (step.index, n)
            # eq. (29) over the union, each top-n renormalised (remainder="drop"), written out here
            union = set().union(*tops.values())
            p = {c: sum(step.weights[n] * tops[n].get(c, 0.0) / sum(tops[n].values()) for n in tops) for c in union}
            best = max(p, key=p.get)
            assert step.text == best
            fused = dict(step.fused_top)
            assert [fused[c] for c, _ in step.fused_top] == pytest.approx([p[c] for c, _ in step.fused_top], abs=2e-3)
            text += step.text
        assert text == PROMPT + gen.text
    finally:
        ref.close()
    # the two tokenizers really are different: Gemma adds a BOS, SmolLM2 does not
    assert gen.steps[0].expert_top["gemma"] != gen.steps[0].expert_top["smol"]


def test_chat_messages_reach_each_expert_in_its_own_template(pool):
    """SmolLM2's first-step distribution for a chat equals the one its server's own /v1/chat/completions (which
    renders the GGUF template itself) gives; Gemma, without a template, reads the transcript; each expert's
    prompt length in its own tokens is reported."""
    import httpx
    import llama_cpp

    messages = [{"role": "user", "content": "Name a primary colour."}]
    coord = Coordinator(clients(pool, ("smol", "gemma")), top_n=TOP_N)
    gen = coord.generate(messages, max_tokens=2)
    assert gen.prompt == messages and gen.prompt_format == {"smol": "chat_template", "gemma": "transcript"}
    own = httpx.post(pool["smol"].url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": TOP_N,
        "logit_bias": {str(i): -100.0 for i in pool["smol"].client().end_ids}}).json()
    first = own["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    got = dict(gen.steps[0].expert_top["smol"])
    ref = {e["token"]: float(np.exp(e["logprob"])) for e in first}
    top = sorted(ref, key=ref.get, reverse=True)[:5]  # (the n-th can tie with the (n+1)-th)
    assert [got.get(t) for t in top] == pytest.approx([ref[t] for t in top], abs=2e-3)
    assert gen.prompt_tokens["smol"] == own["usage"]["prompt_tokens"]
    llm = llama_cpp.Llama(str(pool["gemma"].spec.model_path()), vocab_only=True, verbose=False)
    try:
        assert gen.prompt_tokens["gemma"] == len(llm.tokenize(b"User: Name a primary colour.\nAssistant:"))
    finally:
        llm.close()
    # the gate sees the contents, not the markup
    seen = []
    Coordinator(clients(pool, ("smol",)), lambda text: seen.append(text) or [1.0], top_n=2).generate(
        messages, max_tokens=1)
    assert seen == ["Name a primary colour."]


def test_stream_survives_a_server_killed_mid_generation(pool):
    victim = servers.ServerPool([servers.ServerSpec("victim", "smollm2-135m-instruct")]).start()
    try:
        coord = Coordinator(clients(pool, ("smol", "gemma")) + victim.clients(),
                            top_n=TOP_N, timeout=20)
        out, seen = {}, []

        async def run():
            async for step in coord.astream("The three primary colours are", max_tokens=6, result=out):
                seen.append(step)
                if step.index == 1:
                    victim["victim"].kill()

        import asyncio
        asyncio.run(run())
    finally:
        victim.stop()
    gen = out["generation"]
    assert len(gen.steps) == 6 and gen.finish_reason == "length"
    assert [s.experts for s in gen.steps[:2]] == [["smol", "gemma", "victim"]] * 2
    assert all(s.experts == ["smol", "gemma"] for s in gen.steps[2:])
    assert "victim" in gen.steps[2].dropped and gen.dropped["victim"].startswith("failed")
    assert gen.steps[2].weights == pytest.approx({"smol": 0.5, "gemma": 0.5})  # eq. (2) on the survivors
    assert gen.text == "".join(s.text for s in gen.steps)


def test_silent_server_times_out_and_all_down_is_a_clear_error(pool):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        coord = Coordinator([ExpertClient(url, "silent"), ExpertClient(pool["smol"].url, "smol")],
                            top_n=4, timeout=0.5)
        gen = coord.generate("Hello", max_tokens=2)
        assert gen.dropped["silent"].startswith("failed: timeout: no answer within 0.5 s")
        assert [s.experts for s in gen.steps] == [["smol"], ["smol"]]
        dead = Coordinator([ExpertClient(url, "silent"), ExpertClient(f"http://127.0.0.1:{servers.free_port()}",
                                                                      "gone")], timeout=0.5)
        with pytest.raises(AllExpertsFailed, match="all experts failed.*silent.*gone"):
            dead.generate("Hello", max_tokens=2)


def test_budgets_drop_the_slowest_and_report_energy(pool):
    costs = {"smol": ExpertCost(0.01, 0.5), "smol-b": ExpertCost(0.02, 0.7), "gemma": ExpertCost(3.0, 2.0)}
    coord = Coordinator(clients(pool), top_n=4, costs=costs, deadline_s=5.0)
    gen = coord.generate("The capital of France is", max_tokens=3)
    assert len(gen.steps) == 3
    assert gen.selected == ["smol", "smol-b"] and gen.dropped["gemma"].startswith("deadline")
    assert gen.energy_j == pytest.approx(3 * (0.5 + 0.7)) and gen.energy_source.startswith("estimated")
    assert gen.delay_s > 0 and all(s.experts == ["smol", "smol-b"] for s in gen.steps)
    # energy budget (eq. 12): 3 tokens of all three cost 9.6 J > 4 J; dropping gemma leaves 3.6 J
    coord = Coordinator(clients(pool), top_n=4, costs=costs, energy_j=4.0)
    gen = coord.generate("The capital of France is", max_tokens=3)
    assert gen.selected == ["smol", "smol-b"] and gen.dropped["gemma"].startswith("energy")
    assert gen.energy_j <= 4.0


def test_deadline_at_run_time_drops_the_measured_slowest_then_stops(pool):
    coord = Coordinator(clients(pool, ("smol", "gemma")), top_n=4, deadline_s=3.0)  # no estimates: measured
    gen = coord.generate("Once upon a time", max_tokens=60)
    assert gen.steps[0].experts == ["smol", "gemma"] and gen.dropped["gemma"].startswith("deadline")
    gone = next(s.index for s in gen.steps if "gemma" in s.dropped)
    assert all(s.experts == ["smol"] for s in gen.steps[gone:])
    assert gen.finish_reason in ("deadline", "stop") and len(gen.steps) < 60
    assert gen.delay_s <= 3.0 + 2.0  # the deadline is hard: no step runs past it (without it: 60 s)
    if gen.finish_reason == "deadline":
        assert gen.delay_s >= 3.0 and gen.dropped["smol"].startswith("deadline")


def test_a_hung_expert_cannot_hold_a_step_past_the_deadline(pool):
    """Each step's requests get min(timeout, time left): the step ends at the deadline with the experts that
    answered, their weights renormalised (eq. (2)); the hung one is dropped, not waited for (timeout 60 s)."""
    gate = lambda prompt: np.array([0.5, 0.2, 0.3])  # noqa: E731
    with Silent() as silent:
        coord = Coordinator([ExpertClient(silent.url, "silent")] + clients(pool, ("smol", "gemma")), gate,
                            top_n=4, timeout=60, deadline_s=4.0)
        t0 = time.monotonic()
        gen = coord.generate("The capital of Italy is", max_tokens=5)
        wall = time.monotonic() - t0
    assert 4.0 <= wall < 4.0 + 3.0, wall
    assert gen.finish_reason == "deadline" and gen.dropped["silent"].startswith("deadline: no answer in the")
    first = gen.steps[0]
    assert first.experts == ["smol", "gemma"] and "silent" in first.dropped
    assert first.weights == pytest.approx({"smol": 0.4, "gemma": 0.6})
    assert gen.text == "".join(s.text for s in gen.steps)
    # nobody answers before the deadline: a clear "deadline" finish with no text, not an error
    with Silent() as silent:
        t0 = time.monotonic()
        gen = Coordinator([ExpertClient(silent.url, "silent")], timeout=60, deadline_s=1.0).generate("Hi", max_tokens=3)
        assert time.monotonic() - t0 < 2.5
    assert (gen.finish_reason, gen.text, gen.steps) == ("deadline", "", [])
    assert list(gen.dropped) == ["silent"] and gen.dropped["silent"].startswith("deadline: no answer in the")


def test_a_trickling_expert_is_cut_at_the_timeout_without_a_deadline(pool):
    with Trickle() as slow:
        coord = Coordinator([ExpertClient(slow.url, "trickle")] + clients(pool, ("smol",)), top_n=4, timeout=2.0)
        t0 = time.monotonic()
        gen = coord.generate("Hello", max_tokens=2)
        wall = time.monotonic() - t0
    assert gen.dropped["trickle"] == "failed: timeout: no answer within 2 s"
    assert [s.experts for s in gen.steps] == [["smol"], ["smol"]]
    assert wall < 2.0 + 3.0, wall  # (without the wall-clock bound: 60 s of trickle)


def test_the_pace_comes_from_decode_steps_not_the_prompt_step(pool):
    """The first step also processes the prompt; taken as the per-token pace it would drop gemma at step 1
    (≈260 prompt tokens here). Gemma's pace is its decode steps, so it is dropped at step 2, by that pace."""
    prompt = f"Counting ({time.time_ns()}): " + ", ".join(str(i) for i in range(1, 51)) + ","
    coord = Coordinator(clients(pool, ("smol", "gemma")), top_n=4, deadline_s=10.0)
    gen = coord.generate(prompt, max_tokens=80)
    assert [s.experts for s in gen.steps[:2]] == [["smol", "gemma"]] * 2, [s.dropped for s in gen.steps[:3]]
    assert "gemma" in gen.steps[2].dropped, gen.dropped
    reason = gen.steps[2].dropped["gemma"]
    m = re.fullmatch(r"deadline: 78 tokens x ([0-9.e+-]+) s/token > ([0-9.e+-]+) s left", reason)
    assert m, reason
    decode = gen.steps[1].expert_latency_s["gemma"]
    assert float(m.group(1)) == pytest.approx(decode, rel=0.01)  # its one decode step so far
    assert gen.steps[0].expert_latency_s["gemma"] > decode  # the prompt step was slower
    assert all(s.experts == ["smol"] for s in gen.steps[2:]) and gen.delay_s <= 12.0


def test_servers_listen_on_loopback_only_and_log_privately(pool):
    import os
    import stat
    import warnings

    for s in pool.servers:
        assert s.host == "127.0.0.1" and listening_addresses(s.port) == {"127.0.0.1"}
        mode = stat.S_IMODE(os.stat(s.log_path.parent).st_mode)
        assert mode & 0o077 == 0 and s.log_path.parent != Path(tempfile.gettempdir()), oct(mode)
    spec = servers.ServerSpec("x", "smollm2-135m-instruct")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        servers.ExpertServer(spec, port=8, host="192.0.2.1")  # (not started)
    assert any("no authentication" in str(w.message) for w in seen)


def test_coordinator_options_are_checked_and_named():
    for kw, param in [({"deadline_s": float("nan")}, "deadline_s"), ({"deadline_s": -1}, "deadline_s"),
                      ({"energy_j": float("nan")}, "energy_j"), ({"timeout": float("inf")}, "timeout"),
                      ({"timeout": 0}, "timeout"),
                      ({"top_n": 0}, "top_n"), ({"top_k": True}, "top_k"), ({"remainder": "x"}, "remainder")]:
        with pytest.raises(InputError) as info:
            Coordinator([ExpertClient("http://127.0.0.1:1", "a")], **kw)
        assert info.value.param == param


def test_cli_generate_against_the_servers(pool, tmp_path):
    urls = ",".join(f"{n}={pool[n].url}" for n in ("smol", "gemma"))
    trace = tmp_path / "trace.json"
    out = subprocess.run([sys.executable, "-m", "moe2lib", "generate", PROMPT, "--experts", urls, "--max-tokens", "3",
                          "--top-n", str(TOP_N), "--trace", str(trace)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    gen = json.loads(trace.read_text())
    assert out.stdout == gen["text"] + "\n" and gen["text"] == "".join(s["text"] for s in gen["steps"])
    assert "experts ['smol', 'gemma']" in out.stderr


def test_server_logprobs_ignore_temperature_and_the_eos_bias(pool):
    """llama-cpp-python's top_logprobs are the raw log-softmax: sampling settings do not move them."""
    import httpx

    url = pool["smol"].url + "/v1/completions"
    base = {"prompt": PROMPT, "max_tokens": 1, "logprobs": 5}
    a = httpx.post(url, json={**base, "temperature": 0.0}, timeout=60).json()["choices"][0]
    b = httpx.post(url, json={**base, "temperature": 1.5, "seed": 7, "logit_bias": {
        str(i): -100.0 for i in pool["smol"].client().end_ids}}, timeout=60).json()["choices"][0]
    if a["finish_reason"] == "stop":  # greedy EOS: no logprobs at all without the bias
        assert a["logprobs"]["top_logprobs"] == []
    else:
        assert a["logprobs"]["top_logprobs"][0] == pytest.approx(b["logprobs"]["top_logprobs"][0], abs=1e-4)
    top = b["logprobs"]["top_logprobs"][0]
    assert fusion.STOP in top  # SmolLM2 would end here: EOS is in its top-5, as ""
    assert sum(np.exp(v) for v in top.values()) < 1.0


def test_client_learns_end_tokens_when_eos_hides_the_logprobs(pool):
    import asyncio

    import httpx

    async def ask(client):
        async with httpx.AsyncClient() as http:
            return await client.next_distribution(http, PROMPT, 5, 30)

    plain = ExpertClient(pool["smol"].url, "smol")  # no end_ids given: SmolLM2's greedy token here is EOS
    top = asyncio.run(ask(plain))
    assert set(plain.end_ids) <= set(pool["smol"].client().end_ids) and 2 in plain.end_ids
    assert len(top) >= 5 and fusion.STOP in top and top == pytest.approx(asyncio.run(ask(pool["smol"].client())),
                                                                        abs=1e-4)


def test_cli_serve_experts_and_serve(tmp_path):
    import time

    import httpx

    def start(args):
        return subprocess.Popen([sys.executable, "-m", "moe2lib", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    base = servers.free_port()
    experts = start(["serve-experts", "--models", "smollm2-135m-instruct", "--base-port", str(base)])
    port = servers.free_port()
    api = None
    try:
        lines = []
        for line in experts.stdout:
            lines.append(line)
            if line.startswith("experts: "):
                break
        assert lines[-1].strip() == f"experts: smollm2-135m-instruct=http://127.0.0.1:{base}", "".join(lines)
        assert lines[-2].startswith("chat templates: smollm2-135m-instruct=") and lines[-2].strip().endswith(".gguf")
        api = start(["serve", "--experts", lines[-1].split(": ", 1)[1].strip(), "--port", str(port),
                     "--chat-templates", lines[-2].split(": ", 1)[1].strip()])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hello", "max_tokens": 2},
                               timeout=30)
                break
            except httpx.ConnectError:
                time.sleep(0.3)
        assert r.status_code == 200 and r.json()["moe2"]["selected"] == ["smollm2-135m-instruct"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1})
        assert r.json()["moe2"]["prompt_format"] == {"smollm2-135m-instruct": "chat_template"}, r.text
        # both the expert server and the endpoint listen on loopback only, by default
        assert listening_addresses(base) == {"127.0.0.1"} and listening_addresses(port) == {"127.0.0.1"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b" " * (Limits().max_body_bytes + 1),
                       timeout=30)
        assert r.status_code == 413
    finally:
        for proc in (api, experts):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
    with socket.socket() as sock:  # SIGTERM stopped the expert server too
        assert sock.connect_ex(("127.0.0.1", base)) != 0


def test_parsing_and_inputs_without_servers():
    api = OpenAICompletions()
    assert api.parse({"choices": [{"text": "", "logprobs": {"top_logprobs": []}, "finish_reason": "stop"}]}) == {
        fusion.STOP: 1.0}
    got = api.parse({"choices": [{"logprobs": {"top_logprobs": [{" a": np.log(0.5), "": np.log(0.25)}]},
                                  "finish_reason": "length"}]})
    assert got == pytest.approx({" a": 0.5, fusion.STOP: 0.25})
    native = APIS["llama-server"]  # llama.cpp's /completion: newer (logprob) and older (prob) answers
    new = {"completion_probabilities": [{"id": 5, "token": " a", "logprob": -0.1, "top_logprobs": [
        {"id": 5, "token": " a", "logprob": np.log(0.6)}, {"id": 9, "token": " b", "logprob": np.log(0.3)}]}]}
    old = {"completion_probabilities": [{"content": " a", "probs": [{"tok_str": " a", "prob": 0.6},
                                                                    {"tok_str": " b", "prob": 0.3}]}]}
    assert native.parse(new) == pytest.approx({" a": 0.6, " b": 0.3}) == native.parse(old)
    assert native.parse({"completion_probabilities": [], "stop": True}) == {fusion.STOP: 1.0}
    assert native.payload("x", 4, None)["n_probs"] == 4
    for bad in ({"choices": [{"logprobs": {"top_logprobs": [{" a": 800.0}]}}]},   # exp overflows
                {"choices": [{"logprobs": {"top_logprobs": [{" a": "x"}]}}]},
                {"choices": [{"logprobs": {"top_logprobs": [{" a": None}]}, "finish_reason": "length"}]},
                {"choices": ["text"]}):
        with pytest.raises(ExpertFailed):
            api.parse(bad)
    with pytest.raises(ExpertFailed):
        native.parse({"completion_probabilities": [{"probs": [{"tok_str": "a", "prob": float("nan")}]}]})
    assert [c.name for c in clients_from_urls("a=http://h:1, http://h:2")] == ["a", "h:2"]
    with pytest.raises(InputError, match="experts"):
        clients_from_urls("ftp://h:1")
    assert OpenAICompletions().prompt_tokens({"choices": [], "usage": {"prompt_tokens": 12}}) == 12
    assert native.prompt_tokens({"tokens_evaluated": 7}) == 7 and api.prompt_tokens({"choices": []}) is None


def test_costs_from_a_profiles_file(tmp_path):
    from moe2lib.infra.artifacts import write_json
    from moe2lib.serve.coordinator import load_costs

    doc = {"modes": {"measured": {
        "a": {"device": "cpu-local", "classes": {"all": {"delay_s": {"1": 0.5, "32": 2.05},
                                                         "energy_j": {"1": 3.0, "32": 9.2}}}},
        "b": {"device": "cpu-local", "classes": {"all": {"delay_s": {"1": 0.2, "32": None}, "energy_j": {}}}}}}}
    costs = load_costs(write_json(tmp_path / "profiles.json", doc), ["a", "b"])
    assert costs["a"].delay_s == pytest.approx(0.05) and costs["a"].prompt_delay_s == pytest.approx(0.45)
    assert costs["a"].energy(32) == pytest.approx(9.2) and costs["b"] == ExpertCost(0.2, 0.0, 0.0, 0.0)
    with pytest.raises(InputError, match="profiles.json.*'c'"):
        load_costs(tmp_path / "profiles.json", ["a", "c"])
    with pytest.raises(InputError, match="mode"):
        load_costs(tmp_path / "profiles.json", mode="paper-testbed")


def test_gating_network_weights_the_experts(pool, tmp_path):
    """The gating stage's network (eq. (1)) gives the weights; Top-k (27)–(28) renormalises them."""
    from moe2lib.core.gating import GatingNetwork
    from moe2lib.models.clustering import embed_texts
    from moe2lib.serve.coordinator import gate_from_gating

    rng = np.random.default_rng(0)
    texts = [f"question {i} about {w}" for i, w in enumerate(["algebra", "history", "law", "physics"] * 5)]
    net = GatingNetwork(hidden=(8,), max_epochs=2).fit(embed_texts(texts, progress=False),
                                                       rng.dirichlet(np.ones(4), (20, 3)), rng.integers(0, 4, 20))
    net.save(tmp_path / "gating.safetensors")
    gate = gate_from_gating(tmp_path / "gating.safetensors")
    g = gate(PROMPT)
    assert g.shape == (3,) and g.sum() == pytest.approx(1.0)
    gen = Coordinator(clients(pool), gate, top_k=2, top_n=4).generate(PROMPT, max_tokens=1)
    keep = np.argsort(-g, kind="stable")[:2]
    names = ["smol", "smol-b", "gemma"]
    assert gen.selected == [names[i] for i in sorted(keep)]
    assert gen.steps[0].weights == pytest.approx({names[i]: g[i] / g[keep].sum() for i in keep})


def test_expert_urls_with_and_without_names():
    from moe2lib.serve.coordinator import clients_from_urls

    a, b, c = clients_from_urls("e0=http://127.0.0.1:1/v1?x=1,http://127.0.0.1:2/?y=2,e2=http://h:3")
    assert (a.name, a.url.rstrip("/")) == ("e0", "http://127.0.0.1:1/v1?x=1")
    assert b.url.rstrip("/") == "http://127.0.0.1:2/?y=2" and c.name == "e2"
