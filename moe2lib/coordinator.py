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
energy budget; during generation the measured time of decode steps (not the first step, which includes
prompt processing) replaces the delay estimates. The deadline is hard: each step's expert requests get
min(timeout, time left) of wall-clock time, experts that have not answered by then are dropped from the
step and the step is fused from those that did. Faults: an expert that errors, times out or disconnects is
dropped, the weights are renormalised on the survivors (eq. (2), Theorem 1) and generation goes on; every
step records who took part.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
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
        tops = (choice.get("logprobs") or {}) if isinstance(choice, dict) else {}
        tops = (tops.get("top_logprobs") if isinstance(tops, dict) else None) or []
        if isinstance(tops, list) and tops and isinstance(tops[0], dict) and tops[0]:
            try:
                return _checked(fusion.probs_from_logprobs(tops[0]))
            except (TypeError, ValueError) as exc:
                raise ExpertFailed(f"unreadable top_logprobs: {str(tops[0])[:200]}") from exc
        if not isinstance(choice, dict):
            raise ExpertFailed(f"unreadable choice: {str(choice)[:200]}")
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
        try:
            return self._parse(js)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ExpertFailed(f"unreadable answer: {str(js)[:200]}") from exc

    def _parse(self, js):
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
        return _checked(out)


def _checked(top: dict[str, float]) -> dict[str, float]:
    """A server's distribution, or ExpertFailed when it is not one (a bad answer must drop the expert,
    not reach the fusion maths as NaN or as an input error of the request)."""
    if not top or not all(math.isfinite(v) and v >= 0 for v in top.values()) or sum(top.values()) <= 0:
        raise ExpertFailed(f"not a distribution: {str(top)[:200]}")
    return top


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
            try:
                self.end_ids = await self.learn_end_ids(client, timeout)
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass  # the server cannot say; not asked again
            self._learned = True  # not reached when the step's time bound cancels the lookup: asked again
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

def _positive(x, name: str, zero: bool = False, inf: bool = False) -> float:
    """A number > 0 (>= 0 with ``zero``; +inf only with ``inf``), else InputError naming the parameter."""
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"must be a number, got {x!r}", param=name) from None
    if isinstance(x, bool) or math.isnan(v) or v < 0 or (v == 0 and not zero) or (v == math.inf and not inf):
        raise InputError(f"must be a {'' if inf else 'finite '}number {'>=' if zero else '>'} 0, got {x!r}",
                         param=name)
    return v


DECODE_WINDOW = 3  # the pace of an expert: the median of its last few decode steps


def _late(exc: BaseException) -> bool:
    """True for a request that ran out of time (httpx's own timeouts or the step's wall-clock bound)."""
    return isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError, TimeoutError))


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
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"must be None or an integer >= 1, got {top_k!r}", param="top_k")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise InputError(f"must be an integer >= 1, got {top_n!r}", param="top_n")
        if remainder not in fusion.REMAINDERS:
            raise InputError(f"must be one of {fusion.REMAINDERS}, got {remainder!r}", param="remainder")
        timeout = _positive(timeout, "timeout")
        deadline_s = None if deadline_s is None else _positive(deadline_s, "deadline_s", inf=True)
        energy_j = None if energy_j is None else _positive(energy_j, "energy_j", zero=True, inf=True)
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
        measured: dict[str, float] = {}            # each expert's latest step time (reported)
        decode: dict[str, list[float]] = {}        # each expert's decode-step times (steps >= 1): its pace
        text, steps, energy, finish = "", [], 0.0, "length"
        energy += sum(costs[n].prompt_energy_j for n in selected if n in costs)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=len(names))) as client:
            for index in range(max_tokens):
                step_dropped: dict[str, str] = {}
                if index > 0 and not self._runtime_budgets(alive, names, decode, costs, t0, energy,
                                                           max_tokens - index, step_dropped):
                    finish = next(iter(step_dropped.values())).split(":")[0] if step_dropped else "deadline"
                    dropped.update(step_dropped)
                    break
                # wall-clock bound of this step's requests: the timeout, or less when the deadline is nearer
                limit, by_deadline = self.timeout, False
                if self.deadline_s is not None:
                    left = self.deadline_s - (time.monotonic() - t0)
                    if left <= 0:  # reached during planning or the first step's setup
                        for i in np.flatnonzero(alive):
                            step_dropped[names[i]] = "deadline: reached"
                        dropped.update(step_dropped)
                        finish = "deadline"
                        break
                    if left < limit:
                        limit, by_deadline = left, True
                active = [i for i in np.flatnonzero(alive)]
                ts = time.monotonic()
                results = await asyncio.gather(*(self._ask(client, self.experts[i], prompt + text, limit)
                                                 for i in active), return_exceptions=True)
                tops, ok, late = [], [], False
                for i, res in zip(active, results):
                    if isinstance(res, BaseException):
                        alive[i] = False
                        if by_deadline and _late(res):
                            late = True
                            step_dropped[names[i]] = f"deadline: no answer in the {limit:.3g} s left"
                        elif _late(res):
                            step_dropped[names[i]] = f"failed: timeout: no answer within {limit:.3g} s"
                        else:
                            step_dropped[names[i]] = f"failed: {type(res).__name__}: {res}"[:300]
                    else:
                        (top, dt) = res
                        measured[names[i]] = dt
                        if index > 0:
                            decode.setdefault(names[i], []).append(dt)
                        tops.append(top)
                        ok.append(i)
                dropped.update(step_dropped)
                if not ok and late:  # the deadline came before any answer: end here, with what was made
                    finish = "deadline"
                    break
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

    def _pace(self, name: str, decode: Mapping[str, list[float]], costs: Mapping[str, ExpertCost]) -> float | None:
        """Seconds per token of an expert: its measured decode steps once there are any (the first step also
        processed the prompt, so it overstates the pace), else its estimate, else unknown (None)."""
        times = decode.get(name)
        if times:
            return float(statistics.median(times[-DECODE_WINDOW:]))
        return costs[name].delay_s if name in costs else None

    def _runtime_budgets(self, alive, names, decode, costs, t0, energy, remaining, step_dropped) -> bool:
        """Drop experts that would break the budgets from here on; False when no expert can continue.

        An expert of unknown pace is kept: the step's wall-clock bound still holds the deadline."""
        if self.deadline_s is not None:
            left = self.deadline_s - (time.monotonic() - t0)
            if left <= 0:
                for i in np.flatnonzero(alive):
                    step_dropped[names[i]] = "deadline: reached"
                return False
            while alive.sum() > 1:
                pace = {i: p for i in np.flatnonzero(alive)
                        if (p := self._pace(names[i], decode, costs)) is not None}
                if not pace or max(pace.values()) * remaining <= left:
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

    async def _ask(self, client, expert: ExpertClient, text: str, limit: float):
        """One expert's distribution within ``limit`` seconds of wall-clock time (all its requests together:
        httpx's timeouts are per read, so a server that trickles bytes would otherwise hold the step)."""
        ts = time.monotonic()
        top = await asyncio.wait_for(expert.next_distribution(client, text, self.top_n, limit), limit)
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
    """What one request may ask of the endpoint; beyond it the answer is a 4xx, never work."""

    max_prompt_chars: int = 4000
    max_tokens: int = 256
    max_concurrency: int = 2
    max_body_bytes: int = 128 * 1024   # the HTTP body (413 beyond); a 4000-char prompt of \uXXXX escapes is 24 KB
    max_stop: int = 16                 # stop strings per request

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_tokens", "max_concurrency", "max_body_bytes", "max_stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"must be an integer >= 1, got {v!r}", param=name)


class BodyTooLarge(InputError):
    """The HTTP request body is over :attr:`Limits.max_body_bytes` (HTTP 413)."""


@dataclass(frozen=True)
class ParsedRequest:
    """A checked completion request: the prompt text, :meth:`Coordinator.astream`'s options, streaming or not."""

    prompt: str
    options: dict
    stream: bool


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer too large for a float
        return False


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_request(raw: bytes | str, chat: bool, limits: Limits = Limits()) -> ParsedRequest:
    """Check a ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body; InputError says what is wrong.

    Any body either gives a request within ``limits`` or an InputError (the endpoint's 400/413): never another
    exception, so that no input reaches the experts unchecked or ends as a 500.
    """
    if len(raw) > limits.max_body_bytes:
        raise BodyTooLarge(f"the request body has {len(raw)} bytes; the limit is {limits.max_body_bytes}")
    try:
        body = json.loads(raw, parse_constant=_no_constant)  # NaN/Infinity are not JSON
    except (ValueError, RecursionError) as exc:  # also bad UTF-8 and over-long integers
        raise InputError(f"the request body is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    if chat:
        prompt = render_chat(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt must be a non-empty string", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                         param="prompt")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):  # "\ud800" escapes: no UTF-8 for the experts
        raise InputError("prompt holds an unpaired surrogate (not valid Unicode text)", param="prompt")
    n = body.get("max_tokens")
    n = min(16, limits.max_tokens) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_tokens:
        raise InputError(f"max_tokens must be an integer in [1, {limits.max_tokens}]", param="max_tokens")
    t = body.get("temperature", 0.0)
    t = 0.0 if t is None else t
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not _finite(t) or t < 0:
        raise InputError("temperature must be a finite number >= 0", param="temperature")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > limits.max_stop:
        raise InputError(f"stop must be a string or a list of at most {limits.max_stop} strings", param="stop")
    seed = body.get("seed", 0)
    seed = 0 if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise InputError("seed must be an integer in [0, 2^63)", param="seed")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InputError("stream must be true or false", param="stream")
    return ParsedRequest(prompt, dict(max_tokens=n, temperature=float(t), seed=seed, stop=stop), bool(stream))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (BodyTooLarge) as soon as its declared or received size passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.strip().isdigit()):
            raise InputError(f"bad Content-Length {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise BodyTooLarge(f"the request body has {int(declared)} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # chunked bodies declare no length: stop reading at the limit
            raise BodyTooLarge(f"the request body has more than {max_bytes} bytes; the limit is {max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(coordinator: Coordinator, limits: Limits = Limits(), model_name: str = "moe2"):
    """FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream`` optional).

    Bad requests get 400 (413 for a body over ``limits.max_body_bytes``), more than ``limits.max_concurrency``
    at once 429, all experts down 503. Serve it on 127.0.0.1 (``python -m moe2lib serve`` does by default):
    it has no authentication.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    app = FastAPI(title="MoE2 coordinator", version="1")
    busy = {"n": 0}

    def error(status, msg):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error" if status < 500
                                       else "server_error"}}, status_code=status,
                            headers={"Retry-After": "1"} if status in (429, 503) else None)

    async def handle(request: Request, chat: bool):
        try:
            req = parse_request(await read_body(request, limits.max_body_bytes), chat, limits)
        except BodyTooLarge as exc:
            return error(413, str(exc))
        except InputError as exc:
            return error(400, str(exc))
        prompt, opts = req.prompt, req.options
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
        if req.stream:
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
