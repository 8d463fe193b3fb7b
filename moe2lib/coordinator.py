"""The MoE2 coordinator (Alg. 3): fused token-level generation across real expert servers.

For a prompt: gating values g(x) over the K experts (eq. (1); default uniform), restricted to the
subset S (eq. (2)), Top-k (eqs. (26)–(28)); then, token by token, every kept expert is asked in
parallel (async httpx, per-request timeout) for its next-token top-n distribution given the common
text, the distributions are fused over their text (:mod:`moe2lib.fusion`, eq. (29)), a string is chosen
(argmax or seeded sampling) and appended, until end of text, a stop string or ``max_tokens``.

Servers (a client per API in ``APIS``):

* ``"openai"`` — ``POST /v1/completions`` with ``max_tokens=1, logprobs=n, temperature=0``:
  llama-cpp-python's server (``python -m llama_cpp.server``) and vLLM's OpenAI-compatible server.
  llama-cpp-python 0.3.36 answers with ``choices[0].logprobs.top_logprobs[0]``: a dict from token
  STRING to log-probability, the log-softmax of the raw last-position logits over the full vocabulary
  (``Llama.logits_to_logprobs``) — not affected by temperature, top-k/top-p or the seed. Tokens with the
  same string collapse into one key (the lowest such logprob wins, as a dict comprehension overwrites);
  EOS and other special tokens and partial UTF-8 bytes detokenise to "" (our ``STOP``); the sampled token
  is added, so a dict can hold n+1 keys. When the sampled token is end-of-generation the server returns
  no logprobs at all (``finish_reason="stop"``); so the client sends ``logit_bias`` -100 on the expert's
  end tokens (``ExpertClient.end_ids``, known for servers we start), which moves the sample but not the
  returned logprobs (checked in tests/test_coordinator.py). A client without ``end_ids`` that meets
  such an answer learns them once from ``/extras/tokenize`` (usual end markers that are single tokens)
  and asks again; where that fails it reports the expert as a point mass on ``STOP`` (its argmax).
* ``"llama-server"`` — llama.cpp's native ``POST /completion`` with ``n_probs`` (``completion_probabilities``).

Budgets (eqs. (9), (12)) are enforced per request with per-expert estimates (:class:`ExpertCost`, or the
profiles stage's ``profiles.json``): before the first token the slowest expert is dropped while the
estimated delay max_k(T_k) exceeds the deadline, and the most energy-hungry one while Σ_k E_k exceeds the
energy budget; during generation measured step times replace the delay estimates. Faults: an expert that
errors, times out or disconnects is dropped, the weights are renormalised on the survivors (eq. (2),
Theorem 1) and generation goes on; every step records who took part.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Sequence

import httpx
import numpy as np
from starlette.requests import Request  # FastAPI resolves the endpoints' annotations in this module

from . import fusion
from .errors import InputError, ResourceUnavailable


class AllExpertsFailed(ResourceUnavailable):
    """No expert is left to answer: each one's failure is in the message."""


class ExpertFailed(RuntimeError):
    """One expert's request failed (bad status, unreadable answer)."""


# --------------------------------------------------------------------------- server APIs

class ExpertAPI:
    """How to ask one kind of server for the next-token top-n distribution of a text."""

    name = "base"
    path = ""

    def payload(self, text: str, top_n: int, model: str | None, end_ids=()) -> dict:
        raise NotImplementedError

    def parse(self, js: dict) -> dict[str, float]:
        """``{token string: probability}``; end of text as ``fusion.STOP``."""
        raise NotImplementedError


APIS: dict[str, ExpertAPI] = {}


def _api(cls):
    APIS[cls.name] = cls()
    return cls


@_api
class OpenAICompletions(ExpertAPI):
    """``/v1/completions`` with ``logprobs=n`` (llama-cpp-python server, vLLM)."""

    name = "openai"
    path = "/v1/completions"

    def payload(self, text, top_n, model, end_ids=()):
        body = {"prompt": text, "max_tokens": 1, "logprobs": top_n, "temperature": 0.0}
        if end_ids:  # keeps the sampled token off EOS so that the logprobs come back (they stay raw)
            body["logit_bias"] = {str(i): -100.0 for i in end_ids}
        if model:
            body["model"] = model
        return body

    def parse(self, js):
        try:
            choice = js["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise ExpertFailed(f"no choices in the answer: {str(js)[:200]}") from exc
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        if tops and tops[0]:
            return fusion.probs_from_logprobs(tops[0])
        if choice.get("finish_reason") == "stop":
            return {fusion.STOP: 1.0}  # greedy token was EOS: the server returns no logprobs then
        raise ExpertFailed(f"no top_logprobs in the answer: {str(choice)[:200]}")


@_api
class LlamaServerCompletion(ExpertAPI):
    """llama.cpp ``llama-server``'s native ``/completion`` with ``n_probs`` (old and new answer formats)."""

    name = "llama-server"
    path = "/completion"

    def payload(self, text, top_n, model, end_ids=()):
        return {"prompt": text, "n_predict": 1, "n_probs": top_n, "temperature": 0.0, "cache_prompt": True}

    def parse(self, js):
        probs = js.get("completion_probabilities") or []
        if not probs:
            if js.get("stop"):
                return {fusion.STOP: 1.0}
            raise ExpertFailed(f"no completion_probabilities in the answer: {str(js)[:200]}")
        first = probs[0]
        out: dict[str, float] = {}
        if "top_logprobs" in first:  # newer servers: logprobs of the raw distribution
            for e in first["top_logprobs"]:
                out[e["token"]] = out.get(e["token"], 0.0) + float(np.exp(e["logprob"]))
        else:  # older servers: probs
            for e in first.get("probs", []):
                out[e["tok_str"]] = out.get(e["tok_str"], 0.0) + float(e["prob"])
        if not out:
            raise ExpertFailed("empty top-n list")
        return out


@dataclass
class ExpertClient:
    """One expert server reached by URL."""

    url: str
    name: str | None = None
    api: str = "openai"
    model: str | None = None          # the "model" field sent (vLLM needs it; llama-cpp-python ignores it)
    vocab_size: int | None = None     # for remainder="uniform"
    end_ids: tuple[int, ...] = ()     # end-of-generation token ids (servers.vocab_info), biased off the sample

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"expert URL must start with http:// or https://, got {self.url!r}", param="experts")
        if self.api not in APIS:
            raise InputError(f"unknown expert API {self.api!r}; known: {sorted(APIS)}", param="api")
        self.name = self.name or self.url.split("//", 1)[1]
        self._learned = False

    async def next_distribution(self, client: httpx.AsyncClient, text: str, top_n: int,
                                timeout: float) -> dict[str, float]:
        top = await self._request(client, text, top_n, timeout)
        if top == {fusion.STOP: 1.0} and not self.end_ids and self.api == "openai" and not self._learned:
            # the sampled token was EOS, so no logprobs came back: learn the end tokens once and ask again
            self._learned = True
            try:
                self.end_ids = await self.learn_end_ids(client, timeout)
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass
            if self.end_ids:
                top = await self._request(client, text, top_n, timeout)
        return top

    async def _request(self, client, text, top_n, timeout):
        api = APIS[self.api]
        r = await client.post(self.url + api.path, json=api.payload(text, top_n, self.model, self.end_ids),
                              timeout=timeout)
        if r.status_code != 200:
            raise ExpertFailed(f"HTTP {r.status_code}: {r.text[:200]}")
        return api.parse(r.json())

    async def learn_end_ids(self, client: httpx.AsyncClient, timeout: float) -> tuple[int, ...]:
        """Ids of the usual end-of-text markers that are single tokens here (llama-cpp-python ``/extras/tokenize``)."""
        async def tokens(s):
            r = await client.post(self.url + "/extras/tokenize", json={"input": s}, timeout=timeout)
            r.raise_for_status()
            return list(r.json()["tokens"])

        head = await tokens("")  # the BOS the server prepends, if any
        ids = set()
        for marker in END_MARKERS:
            t = await tokens(marker)
            t = t[len(head):] if t[:len(head)] == head else t
            if len(t) == 1:
                ids.add(int(t[0]))
        return tuple(sorted(ids))


END_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


# --------------------------------------------------------------------------- budgets

@dataclass(frozen=True)
class ExpertCost:
    """Per-expert estimates: per-token delay t_k (s) and energy e_k (J), plus a fixed prompt part (eqs. (4)–(6))."""

    delay_s: float
    energy_j: float = 0.0
    prompt_delay_s: float = 0.0
    prompt_energy_j: float = 0.0

    def delay(self, n_tokens: int) -> float:
        return self.prompt_delay_s + n_tokens * self.delay_s

    def energy(self, n_tokens: int) -> float:
        return self.prompt_energy_j + n_tokens * self.energy_j


_DELAY_KEYS = ("delay_s_per_token", "delay_per_token_s", "t_token_s", "seconds_per_token")
_ENERGY_KEYS = ("energy_j_per_token", "energy_per_token_j", "e_token_j", "joules_per_token")


def _line(points: Mapping) -> tuple[float, float] | None:
    """(per token, fixed part) of a cost given at answer lengths N: ``{"1": T1, "32": T32}``."""
    pts = sorted((int(n), float(v)) for n, v in (points or {}).items() if v is not None)
    if not pts:
        return None
    if len(pts) == 1:
        return pts[0][1] / max(pts[0][0], 1), 0.0
    (n1, v1), (n2, v2) = pts[0], pts[-1]
    slope = (v2 - v1) / (n2 - n1)
    return slope, v1 - slope * n1


def load_costs(path, names: Sequence[str] | None = None, *, mode: str = "measured",
               app_class: str = "all") -> dict[str, ExpertCost]:
    """Per-token delay/energy estimates of each expert from the profiles stage's ``profiles.json``.

    That file (moe2lib.profiling) gives, per mode and expert, ``classes[app_class].delay_s`` and ``energy_j``
    at a few answer lengths N; the per-token cost is the slope between the shortest and longest N and the
    prompt part the intercept (eq. (6): T = τ + prefill + N·t). A flat ``{name: {"delay_s_per_token": ..,
    "energy_j_per_token": .., "prompt_delay_s": .., "prompt_energy_j": ..}}`` file is read as well.
    """
    from .artifacts import read_json

    data = read_json(path)
    costs = {}
    if isinstance(data, dict) and isinstance(data.get("modes"), dict):
        modes = data["modes"]
        if mode not in modes:
            raise InputError(f"no profile mode {mode!r}; modes: {sorted(modes)}", path=path, param="mode")
        for name, e in modes[mode].items():
            c = (e.get("classes") or {}).get(app_class) or {}
            d, en = _line(c.get("delay_s")), _line(c.get("energy_j"))
            if d is not None:
                costs[name] = ExpertCost(d[0], en[0] if en else 0.0, d[1], en[1] if en else 0.0)
    elif isinstance(data, dict):
        for name, e in data.items():
            if isinstance(e, dict) and any(k in e for k in _DELAY_KEYS):
                costs[str(name)] = ExpertCost(
                    float(next(e[k] for k in _DELAY_KEYS if k in e)),
                    float(next((e[k] for k in _ENERGY_KEYS if k in e), 0.0)),
                    float(e.get("prompt_delay_s", 0.0)), float(e.get("prompt_energy_j", 0.0)))
    missing = [n for n in (names or []) if n not in costs]
    if not costs or missing:
        raise InputError(f"no delay estimate for {missing or 'any expert'}", path=path)
    return costs


# --------------------------------------------------------------------------- results

@dataclass
class Step:
    """One generated piece of text and how it was made."""

    index: int
    text: str
    experts: list[str]                         # who took part in this step
    weights: dict[str, float]                  # their weights (sum to 1)
    expert_top: dict[str, list[tuple[str, float]]]
    fused_top: list[tuple[str, float]]
    latency_s: float
    expert_latency_s: dict[str, float]
    dropped: dict[str, str] = field(default_factory=dict)   # dropped at this step: name -> reason


@dataclass
class Generation:
    prompt: str
    text: str
    steps: list[Step]
    finish_reason: str                          # stop | length | deadline | energy
    delay_s: float
    energy_j: float
    energy_source: str
    selected: list[str]                         # experts after gating/Top-k/budgets at the start
    dropped: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- coordinator

class Coordinator:
    """Fused generation over expert servers (Alg. 3); constructor stores parameters only.

    gate: ``gate(prompt) -> [K]`` gating values in ``experts`` order (None: uniform). subset: (K,) bool
    mask S (None: all). remainder/prefix: see :mod:`moe2lib.fusion`. costs: name -> ExpertCost (or a
    profiles.json path). deadline_s / energy_j: the application's budgets per request (None: none).
    """

    def __init__(self, experts: Sequence[ExpertClient], gate: Callable[[str], Sequence[float]] | None = None,
                 *, subset: Sequence[bool] | None = None, top_k: int | None = None, top_n: int = 10,
                 remainder: str = "drop", prefix: bool = True, timeout: float = 30.0,
                 costs: Mapping[str, ExpertCost] | str | Path | None = None,
                 deadline_s: float | None = None, energy_j: float | None = None):
        self.experts = list(experts)
        self.gate = gate
        self.subset = subset
        self.top_k = top_k
        self.top_n = top_n
        self.remainder = remainder
        self.prefix = prefix
        self.timeout = timeout
        self.costs = costs
        self.deadline_s = deadline_s
        self.energy_j = energy_j

    # -- planning
    def _costs(self) -> dict[str, ExpertCost]:
        if self.costs is None:
            return {}
        if isinstance(self.costs, (str, Path)):
            if getattr(self, "_loaded", (None,))[0] != self.costs:
                self._loaded = (self.costs, load_costs(self.costs, [e.name for e in self.experts]))
            return self._loaded[1]
        return dict(self.costs)

    def gate_values(self, prompt: str) -> np.ndarray:
        K = len(self.experts)
        g = np.ones(K) / K if self.gate is None else np.asarray(self.gate(prompt), dtype=float).ravel()
        if g.shape != (K,):
            raise InputError(f"gate returned {g.shape[0]} values for {K} experts", param="gate")
        return g

    def plan(self, prompt: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """(gate values, kept mask, dropped-by-budget reasons) before the first token."""
        if not self.experts:
            raise InputError("no experts given", param="experts")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise InputError(f"duplicate expert names {names}", param="experts")
        g = self.gate_values(prompt)
        mask = np.ones(len(g), bool) if self.subset is None else np.asarray(self.subset, bool)
        keep = fusion.top_k_mask(g, self.top_k, mask)
        costs, dropped = self._costs(), {}
        if self.deadline_s is not None:
            while keep.sum() > 1:
                est = {i: costs[names[i]].delay(max_tokens) for i in np.flatnonzero(keep) if names[i] in costs}
                if not est or max(est.values()) <= self.deadline_s:
                    break
                i = max(est, key=est.get)
                keep[i] = False
                dropped[names[i]] = f"deadline: estimated {est[i]:.3g} s > {self.deadline_s:g} s"
        if self.energy_j is not None:
            while keep.sum() > 1:
                est = {i: costs[names[i]].energy(max_tokens) for i in np.flatnonzero(keep) if names[i] in costs}
                if not est or sum(est.values()) <= self.energy_j:
                    break
                i = max(est, key=est.get)
                keep[i] = False
                dropped[names[i]] = f"energy: estimated total {sum(est.values()):.3g} J > {self.energy_j:g} J"
        return g, keep, dropped

    # -- generation
    async def astream(self, prompt: str, *, max_tokens: int = 32, temperature: float = 0.0, seed: int | None = 0,
                      stop: Sequence[str] = (), result: dict | None = None) -> AsyncIterator[Step]:
        """Yield steps as they are made; the finished :class:`Generation` is put in ``result["generation"]``."""
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        t0 = time.monotonic()
        names = [e.name for e in self.experts]
        g, alive, dropped = self.plan(prompt, max_tokens)
        selected = [names[i] for i in np.flatnonzero(alive)]
        costs = self._costs()
        rng = np.random.default_rng(seed)
        measured: dict[str, float] = {}
        text, steps, energy, finish = "", [], 0.0, "length"
        energy += sum(costs[n].prompt_energy_j for n in selected if n in costs)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=len(names))) as client:
            for index in range(max_tokens):
                step_dropped: dict[str, str] = {}
                if index > 0 and not self._runtime_budgets(alive, names, measured, costs, t0, energy,
                                                           max_tokens - index, step_dropped):
                    finish = next(iter(step_dropped.values())).split(":")[0] if step_dropped else "deadline"
                    dropped.update(step_dropped)
                    break
                active = [i for i in np.flatnonzero(alive)]
                ts = time.monotonic()
                results = await asyncio.gather(*(self._ask(client, self.experts[i], prompt + text)
                                                 for i in active), return_exceptions=True)
                tops, ok = [], []
                for i, res in zip(active, results):
                    if isinstance(res, BaseException):
                        alive[i] = False
                        step_dropped[names[i]] = f"failed: {type(res).__name__}: {res}"[:300]
                    else:
                        (top, dt) = res
                        measured[names[i]] = dt
                        tops.append(top)
                        ok.append(i)
                dropped.update(step_dropped)
                if not ok:
                    raise AllExpertsFailed("all experts failed: " + "; ".join(
                        f"{n} ({self._url(n)}): {r}" for n, r in dropped.items()))
                m = np.zeros(len(names), bool)
                m[ok] = True
                w = fusion.subset_weights(g, m)[ok]
                fused = fusion.fuse(tops, w, remainder=self.remainder, prefix=self.prefix,
                                    vocab_sizes=[self.experts[i].vocab_size for i in ok],
                                    names=[names[i] for i in ok])
                piece = fusion.choose(fused, temperature, rng)
                energy += sum(costs[names[i]].energy_j for i in ok if names[i] in costs)
                step = Step(index, piece, [names[i] for i in ok], {names[i]: float(x) for i, x in zip(ok, w)},
                            {names[i]: sorted(t.items(), key=lambda kv: -kv[1])[:self.top_n]
                             for i, t in zip(ok, tops)},
                            fused.top(self.top_n), time.monotonic() - ts,
                            {names[i]: measured[names[i]] for i in ok}, step_dropped)
                if piece == fusion.STOP:
                    steps.append(step)
                    yield step
                    finish = "stop"
                    break
                text += piece
                hit = [text.index(s) for s in stop if s and s in text]
                if hit:
                    cut = min(hit)
                    step.text = piece[:max(0, len(piece) - (len(text) - cut))]
                    text = text[:cut]
                    steps.append(step)
                    yield step
                    finish = "stop"
                    break
                steps.append(step)
                yield step
        have = [n for n in selected if n in costs]
        source = ("estimated:per-token profile x tokens" + ("" if len(have) == len(selected) else
                  f" (no estimate for {sorted(set(selected) - set(have))}: counted as 0)"))
        gen = Generation(prompt, text, steps, finish, time.monotonic() - t0, energy, source, selected, dropped)
        if result is not None:
            result["generation"] = gen

    def _runtime_budgets(self, alive, names, measured, costs, t0, energy, remaining, step_dropped) -> bool:
        """Drop experts that would break the budgets from here on; False when no expert can continue."""
        if self.deadline_s is not None:
            left = self.deadline_s - (time.monotonic() - t0)
            while True:
                pace = {i: measured.get(names[i], costs[names[i]].delay_s if names[i] in costs else 0.0)
                        for i in np.flatnonzero(alive)}
                if not pace or max(pace.values()) * remaining <= left:
                    break
                if len(pace) == 1:
                    if left <= 0:
                        step_dropped[names[next(iter(pace))]] = "deadline: reached"
                        return False
                    break
                i = max(pace, key=pace.get)
                alive[i] = False
                step_dropped[names[i]] = (f"deadline: {remaining} tokens x {pace[i]:.3g} s/token > "
                                          f"{left:.3g} s left")
        if self.energy_j is not None:
            while True:
                per = {i: costs[names[i]].energy_j for i in np.flatnonzero(alive) if names[i] in costs}
                if not per or energy + sum(per.values()) <= self.energy_j:
                    break
                if len(per) == 1 or alive.sum() == 1:
                    step_dropped[names[next(iter(per))]] = "energy: budget spent"
                    return False
                i = max(per, key=per.get)
                alive[i] = False
                step_dropped[names[i]] = f"energy: next token would exceed {self.energy_j:g} J"
        return True

    def _url(self, name):
        return next((e.url for e in self.experts if e.name == name), "?")

    async def _ask(self, client, expert: ExpertClient, text: str):
        ts = time.monotonic()
        top = await expert.next_distribution(client, text, self.top_n, self.timeout)
        return top, time.monotonic() - ts

    async def agenerate(self, prompt: str, **options) -> Generation:
        out: dict = {}
        async for _ in self.astream(prompt, result=out, **options):
            pass
        return out["generation"]

    def generate(self, prompt: str, **options) -> Generation:
        """Blocking fused generation (its own event loop; in a helper thread when one runs here, e.g. Jupyter)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(prompt, **options))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.agenerate(prompt, **options)).result()


def gate_from_gating(path, embed: Callable[[list[str]], np.ndarray] | None = None) -> Callable[[str], np.ndarray]:
    """``gate(prompt)`` from the gating stage: ``GatingNetwork.load(path).predict_proba(embed([prompt]))[0]``.

    ``embed`` must be the embedding the network was trained on (default: ``clustering.embed_texts``); the
    gate's K values follow the experts.json order, so pass the clients in that order.
    """
    from .gating import GatingNetwork  # written by the gating stage

    if embed is None:
        from .clustering import embed_texts

        def embed(texts):
            return embed_texts(texts, progress=False)
    net = GatingNetwork.load(path)
    return lambda prompt: np.asarray(net.predict_proba(embed([prompt])))[0]


def clients_from_urls(urls: str | Sequence[str], api: str = "openai") -> list[ExpertClient]:
    """``"URL,URL"`` or ``name=URL,...`` into clients."""
    items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
    if not items:
        raise InputError("give at least one expert URL", param="experts")
    out = []
    for u in items:
        name, sep, url = u.partition("=")
        if not sep or "://" in name:  # a bare URL (which may itself contain "=")
            name, url = None, u
        out.append(ExpertClient(url, name or None, api))
    return out


# --------------------------------------------------------------------------- OpenAI-compatible endpoint

def render_chat(messages) -> str:
    """Chat messages as one plain transcript ("System:/User:/Assistant:"), since experts' templates differ."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list", param="messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise InputError("each message needs role system|user|assistant and string content",
                             param=f"messages[{i}]")
        lines.append(f"{m['role'].capitalize()}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_tokens: int = 256
    max_concurrency: int = 2


def make_app(coordinator: Coordinator, limits: Limits = Limits(), model_name: str = "moe2"):
    """FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream`` optional)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    app = FastAPI(title="MoE2 coordinator", version="1")
    busy = {"n": 0}

    def error(status, msg):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error" if status < 500
                                       else "server_error"}}, status_code=status)

    def options(body: dict) -> dict:
        n = body.get("max_tokens", 16)
        if not isinstance(n, int) or not 1 <= n <= limits.max_tokens:
            raise InputError(f"max_tokens must be an integer in [1, {limits.max_tokens}]", param="max_tokens")
        t = body.get("temperature", 0.0)
        if not isinstance(t, (int, float)) or t < 0:
            raise InputError("temperature must be a number >= 0", param="temperature")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InputError("stop must be a string or a list of strings", param="stop")
        seed = body.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise InputError("seed must be an integer >= 0", param="seed")
        return dict(max_tokens=n, temperature=float(t), seed=seed, stop=stop)

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise InputError("the request body must be a JSON object")
            if chat:
                prompt = render_chat(body.get("messages"))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise InputError("prompt must be a string", param="prompt")
            if len(prompt) > limits.max_prompt_chars:
                raise InputError(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                                 param="prompt")
            opts = options(body)
        except (InputError, json.JSONDecodeError) as exc:
            return error(400, str(exc))
        if busy["n"] >= limits.max_concurrency:
            return error(429, f"busy: {limits.max_concurrency} requests in flight")
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text, finish, delta=False):
            if chat:
                msg = {"role": "assistant", "content": text}
                return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def info(gen: Generation):
            return {"delay_s": gen.delay_s, "energy_j": gen.energy_j, "energy_source": gen.energy_source,
                    "selected": gen.selected, "dropped": gen.dropped,
                    "steps": [{"text": s.text, "experts": s.experts, "weights": s.weights} for s in gen.steps]}

        busy["n"] += 1  # counted now, so concurrent streaming requests see each other
        if body.get("stream"):
            started = []

            def release_if_unstarted():  # a stream that never ran never reaches its finally
                if not started:
                    busy["n"] -= 1

            async def events():
                started.append(True)
                out: dict = {}
                try:
                    async for s in coordinator.astream(prompt, result=out, **opts):
                        chunk = {"id": cid, "object": kind + (".chunk" if chat else ""), "created": created,
                                 "model": model_name, "choices": [choice(s.text, None, True)],
                                 "moe2": {"experts": s.experts, "weights": s.weights}}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    gen = out["generation"]
                    last = {"id": cid, "object": kind + (".chunk" if chat else ""), "created": created,
                            "model": model_name, "choices": [choice("", gen.finish_reason, True)], "moe2": info(gen)}
                    yield f"data: {json.dumps(last)}\n\n"
                except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not a cut
                    yield f"data: {json.dumps({'error': {'message': f'{type(exc).__name__}: {exc}'}})}\n\n"
                finally:
                    busy["n"] -= 1
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream",
                                     background=BackgroundTask(release_if_unstarted))

        try:
            gen = await coordinator.agenerate(prompt, **opts)
        except AllExpertsFailed as exc:
            return error(503, str(exc))
        except InputError as exc:
            return error(400, str(exc))
        finally:
            busy["n"] -= 1
        return {"id": cid, "object": kind, "created": created, "model": model_name,
                "choices": [choice(gen.text, gen.finish_reason)],
                "usage": {"completion_tokens": len(gen.steps)}, "moe2": info(gen)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "moe2",
                                            "experts": [e.name for e in coordinator.experts]}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
