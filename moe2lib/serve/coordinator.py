"""The MoE2 coordinator (Alg. 3): fused token-level generation across real expert servers.

For a prompt: gating values g(x) over the K experts (eq. (1); default uniform), restricted to the
subset S (eq. (2)), Top-k (eqs. (26)–(28)); then, token by token, every kept expert is asked in
parallel (async httpx, per-request timeout) for its next-token top-n distribution given the common
text, the distributions are fused over their text (:mod:`moe2lib.core.fusion`, eq. (29)), a string is chosen
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

A prompt is a text, sent to every expert as it is, or chat messages, rendered for each expert in its own
chat template (:mod:`moe2lib.serve.chat`); the fused text is appended to each expert's prompt. Each expert's
prompt length in its own tokens is read from its first answer (``usage.prompt_tokens``). The
OpenAI-compatible HTTP endpoint over a coordinator is :mod:`moe2lib.serve.endpoint`.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Sequence, Union

import httpx
import numpy as np

from ..core import fusion, gating
from ..errors import InputError, ResourceUnavailable, check_int
from . import chat


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

    def prompt_tokens(self, js: dict) -> int | None:
        """How many tokens the server read the prompt as (None: the answer does not say)."""
        return None


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

    def prompt_tokens(self, js):
        n = (js.get("usage") or {}).get("prompt_tokens") if isinstance(js, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) else None


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

    def prompt_tokens(self, js):
        n = js.get("tokens_evaluated") if isinstance(js, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) else None


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
    chat_template: chat.ChatTemplate | None = None   # renders chat messages (None: a plain transcript)

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
        return (await self.ask(client, text, top_n, timeout))[0]

    async def ask(self, client: httpx.AsyncClient, text: str, top_n: int,
                  timeout: float) -> tuple[dict[str, float], int | None]:
        """(next-token top-n distribution of ``text``, its length in the server's tokens or None)."""
        top, n = await self._request(client, text, top_n, timeout)
        if top == {fusion.STOP: 1.0} and not self.end_ids and self.api == "openai" and not self._learned:
            # the sampled token was EOS, so no logprobs came back: learn the end tokens once and ask again
            try:
                self.end_ids = await self.learn_end_ids(client, timeout)
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass  # the server cannot say; not asked again
            self._learned = True  # not reached when the step's time bound cancels the lookup: asked again
            if self.end_ids:
                top, n = await self._request(client, text, top_n, timeout)
        return top, n

    async def _request(self, client, text, top_n, timeout):
        api = APIS[self.api]
        r = await client.post(self.url + api.path, json=api.payload(text, top_n, self.model, self.end_ids),
                              timeout=timeout)
        if r.status_code != 200:
            raise ExpertFailed(f"HTTP {r.status_code}: {r.text[:200]}")
        js = r.json()
        return api.parse(js), api.prompt_tokens(js)

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

    That file (read and checked by :func:`moe2lib.models.profiling.load_profiles`: every one of ``names`` in
    every mode) gives, per mode and expert, ``classes[app_class].delay_s`` and ``energy_j`` at a few answer
    lengths N; the per-token cost is the slope between the shortest and longest N and the prompt part the
    intercept (eq. (6): T = τ + prefill + N·t). A flat ``{name: {"delay_s_per_token": ..,
    "energy_j_per_token": .., "prompt_delay_s": .., "prompt_energy_j": ..}}`` file is read as well.
    """
    from ..infra.artifacts import read_json
    from ..models.profiling import load_profiles

    data = read_json(path)
    costs = {}
    if isinstance(data, dict) and "modes" in data:
        data = load_profiles(path, list(names or ()))
        if mode not in data["modes"]:
            raise InputError(f"unknown profile mode {mode!r}; known: {', '.join(data['modes'])}", path=path,
                             param="mode")
        for name, e in data["modes"][mode].items():
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


Prompt = Union[str, Sequence[Mapping[str, str]]]   # a text, or chat messages [{"role", "content"}]


@dataclass
class Generation:
    prompt: Prompt
    text: str
    steps: list[Step]
    finish_reason: str                          # stop | length | deadline | energy
    delay_s: float
    energy_j: float
    energy_source: str
    selected: list[str]                         # experts after gating/Top-k/budgets at the start
    dropped: dict[str, str]
    prompt_tokens: dict[str, int] = field(default_factory=dict)   # each expert's prompt in its own tokens
    prompt_format: dict[str, str] = field(default_factory=dict)   # text | chat_template | transcript

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

    gate: ``gate(text) -> [K]`` gating values in ``experts`` order (a chat's text: its contents; None: uniform).
    subset: (K,) bool mask S (None: all). remainder/prefix: see :mod:`moe2lib.core.fusion`. costs: name -> ExpertCost
    (or a profiles.json path). deadline_s / energy_j: the application's budgets per request (None: none).
    """

    def __init__(self, experts: Sequence[ExpertClient], gate: Callable[[str], Sequence[float]] | None = None,
                 *, subset: Sequence[bool] | None = None, top_k: int | None = None, top_n: int = 10,
                 remainder: str = "drop", prefix: bool = True, timeout: float = 30.0,
                 costs: Mapping[str, ExpertCost] | str | Path | None = None,
                 deadline_s: float | None = None, energy_j: float | None = None):
        self.experts = list(experts)
        top_k = check_int(top_k, "top_k", none=True)
        top_n = check_int(top_n, "top_n")
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

    def gate_values(self, prompt: Prompt) -> np.ndarray:
        """g(x) (eq. (1)) of a text, or of chat messages' contents (:func:`moe2lib.serve.chat.gate_text`)."""
        K = len(self.experts)
        text = prompt if isinstance(prompt, str) else chat.gate_text(prompt)
        g = np.ones(K) / K if self.gate is None else np.asarray(self.gate(text), dtype=float).ravel()
        if g.shape != (K,):
            raise InputError(f"gate returned {g.shape[0]} values for {K} experts", param="gate")
        return g

    def expert_prompts(self, prompt: Prompt) -> dict[str, tuple[str, str]]:
        """Each expert's prompt text and its format: a text as it is (``"text"``); chat messages in the expert's
        chat template (``"chat_template"``) or, for a model without one, a plain transcript (``"transcript"``)."""
        if isinstance(prompt, str):
            return {e.name: (prompt, "text") for e in self.experts}
        return {e.name: chat.render(prompt, e.chat_template) for e in self.experts}

    def plan(self, prompt: Prompt, max_tokens: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """(gate values, kept mask, dropped-by-budget reasons) before the first token."""
        if not self.experts:
            raise InputError("no experts given", param="experts")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise InputError(f"duplicate expert names {names}", param="experts")
        g = self.gate_values(prompt)
        mask = np.ones(len(g), bool) if self.subset is None else np.asarray(self.subset, bool)
        keep = gating.topk_mask(g, self.top_k, mask)
        costs, dropped = self._costs(), {}
        known = [costs.get(n) for n in names]
        if self.deadline_s is not None:  # eq. (9): the slowest member sets the delay
            _drop_costliest(keep, names, lambda i: None if known[i] is None else known[i].delay(max_tokens),
                            lambda est: max(est.values()) > self.deadline_s,
                            lambda i, est: f"deadline: estimated {est[i]:.3g} s > {self.deadline_s:g} s", dropped)
        if self.energy_j is not None:  # eq. (12): the members' energies add up
            _drop_costliest(keep, names, lambda i: None if known[i] is None else known[i].energy(max_tokens),
                            lambda est: sum(est.values()) > self.energy_j,
                            lambda i, est: f"energy: estimated total {sum(est.values()):.3g} J > {self.energy_j:g} J",
                            dropped)
        return g, keep, dropped

    # -- generation
    async def astream(self, prompt: Prompt, *, max_tokens: int = 32, temperature: float = 0.0, seed: int | None = 0,
                      stop: Sequence[str] = (), result: dict | None = None) -> AsyncIterator[Step]:
        """Yield steps as they are made; the finished :class:`Generation` is put in ``result["generation"]``.

        ``prompt``: a text, or chat messages rendered for each expert in its chat template."""
        max_tokens = check_int(max_tokens, "max_tokens")
        run = _Run(self, prompt, max_tokens, temperature, seed, stop)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=len(run.names))) as client:
            while run.finish is None:
                step = await self._step(run, client)
                if step is not None:
                    yield step
        if result is not None:
            result["generation"] = run.generation()

    def _budgets(self, run: "_Run", step_dropped: dict[str, str]) -> "_StepBound | None":
        """Before a step: drop the experts that would break the budgets from here on (the measured pace against
        the time left, the next token's energy against what is left); then the step's wall-clock bound. None (with
        ``run.finish`` set) when no expert can go on."""
        names, alive, index = run.names, run.alive, len(run.steps)
        limit, by_deadline = self.timeout, False
        if self.deadline_s is not None:
            left = self.deadline_s - (time.monotonic() - run.t0)
            if left <= 0:
                return run.end("deadline", {names[i]: "deadline: reached" for i in np.flatnonzero(alive)})
            remaining = run.max_tokens - index
            if index > 0:
                _drop_costliest(alive, names, lambda i: self._pace(names[i], run.decode, run.costs),
                                lambda est: max(est.values()) * remaining > left,
                                lambda i, est: f"deadline: {remaining} tokens x {est[i]:.3g} s/token > "
                                               f"{left:.3g} s left", step_dropped)
            if left < limit:
                limit, by_deadline = left, True
        if self.energy_j is not None and index > 0:
            def next_energy(i):
                return run.costs[names[i]].energy_j if names[i] in run.costs else None
            _drop_costliest(alive, names, next_energy, lambda est: run.energy + sum(est.values()) > self.energy_j,
                            lambda i, est: f"energy: next token would exceed {self.energy_j:g} J", step_dropped)
            per = [e for i in np.flatnonzero(alive) if (e := next_energy(i)) is not None]
            if per and run.energy + sum(per) > self.energy_j:  # the last expert cannot afford a token either
                step_dropped.update({names[i]: "energy: budget spent" for i in np.flatnonzero(alive)})
                return run.end("energy", step_dropped)
        return _StepBound(limit, by_deadline)

    async def _step(self, run: "_Run", client: httpx.AsyncClient) -> Step | None:
        """One token of Alg. 3: the budgets (:meth:`_budgets`), the kept experts' distributions within the step's
        time (:meth:`_gather`), their fusion (eq. (29)) and the choice (:meth:`_fuse`), then the text and whether it
        ends (:meth:`_Run.extend`). Sets ``run.finish`` when the generation ends (None: ended before a step)."""
        step_dropped: dict[str, str] = {}
        bound = self._budgets(run, step_dropped)
        if bound is None:
            return None
        ts = time.monotonic()
        answers = await self._gather(run, client, bound, step_dropped)
        if not answers.experts and answers.late:  # the deadline came before any answer: end here, with what was made
            return run.end("deadline", step_dropped)
        run.dropped.update(step_dropped)
        if not answers.experts:
            raise AllExpertsFailed("all experts failed: " + "; ".join(
                f"{n} ({self._url(n)}): {r}" for n, r in run.dropped.items()))
        step = self._fuse(run, answers, ts, step_dropped)
        run.extend(step)
        return step

    async def _gather(self, run: "_Run", client: httpx.AsyncClient, bound: "_StepBound",
                      step_dropped: dict[str, str]) -> "_Answers":
        """The next-token distributions of the experts still in the run, asked at once, each within the step's
        bound. An expert that fails or is late leaves the run (``step_dropped`` says why); of the others, the
        first step records the prompt tokens, later steps the decode times (their pace)."""
        names, alive, index = run.names, run.alive, len(run.steps)
        active = list(np.flatnonzero(alive))
        results = await asyncio.gather(*(self._ask(client, self.experts[i], run.prompts[names[i]] + run.text,
                                                   bound.limit) for i in active), return_exceptions=True)
        answers = _Answers()
        for i, res in zip(active, results):
            if isinstance(res, BaseException):
                alive[i] = False
                if bound.by_deadline and _late(res):
                    answers.late = True
                    step_dropped[names[i]] = f"deadline: no answer in the {bound.limit:.3g} s left"
                elif _late(res):
                    step_dropped[names[i]] = f"failed: timeout: no answer within {bound.limit:.3g} s"
                else:
                    step_dropped[names[i]] = f"failed: {type(res).__name__}: {res}"[:300]
                continue
            run.measured[names[i]] = res.seconds
            if index == 0 and res.prompt_tokens is not None:
                run.prompt_tokens[names[i]] = res.prompt_tokens
            if index > 0:
                run.decode.setdefault(names[i], []).append(res.seconds)
            answers.experts.append(i)
            answers.tops.append(res.top)
        return answers

    def _fuse(self, run: "_Run", answers: "_Answers", ts: float, step_dropped: dict[str, str]) -> Step:
        """The step of the experts that answered: their weights (the gate renormalised over them), the fused
        distribution (eq. (29)), the piece chosen from it, and the energy it cost."""
        names, ok, tops = run.names, answers.experts, answers.tops
        m = np.zeros(len(names), bool)
        m[ok] = True
        w = gating.subset_weights(run.g, m)[ok]
        fused = fusion.fuse_text(w, tops, remainder=self.remainder, prefix=self.prefix,
                                 vocab_sizes=[self.experts[i].vocab_size for i in ok], names=[names[i] for i in ok])
        piece = fusion.choose(fused, run.temperature, run.rng)
        run.energy += sum(run.costs[names[i]].energy_j for i in ok if names[i] in run.costs)
        return Step(len(run.steps), piece, [names[i] for i in ok], {names[i]: float(x) for i, x in zip(ok, w)},
                    {names[i]: sorted(t.items(), key=lambda kv: -kv[1])[:self.top_n] for i, t in zip(ok, tops)},
                    fused.top(self.top_n), time.monotonic() - ts, {names[i]: run.measured[names[i]] for i in ok},
                    step_dropped)

    def _pace(self, name: str, decode: Mapping[str, list[float]], costs: Mapping[str, ExpertCost]) -> float | None:
        """Seconds per token of an expert: its measured decode steps once there are any (the first step also
        processed the prompt, so it overstates the pace), else its estimate, else unknown (None: kept, the
        step's wall-clock bound still holds the deadline)."""
        times = decode.get(name)
        if times:
            return float(statistics.median(times[-DECODE_WINDOW:]))
        return costs[name].delay_s if name in costs else None

    def _url(self, name):
        return next((e.url for e in self.experts if e.name == name), "?")

    async def _ask(self, client, expert: ExpertClient, text: str, limit: float) -> "_Answer":
        """One expert's answer within ``limit`` seconds of wall-clock time (all its requests together: httpx's
        timeouts are per read, so a server that trickles bytes would otherwise hold the step)."""
        ts = time.monotonic()
        top, n = await asyncio.wait_for(expert.ask(client, text, self.top_n, limit), limit)
        return _Answer(top, n, time.monotonic() - ts)

    async def agenerate(self, prompt: Prompt, **options) -> Generation:
        out: dict = {}
        async for _ in self.astream(prompt, result=out, **options):
            pass
        return out["generation"]

    def generate(self, prompt: Prompt, **options) -> Generation:
        """Blocking fused generation (its own event loop; in a helper thread when one runs here, e.g. Jupyter)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(prompt, **options))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.agenerate(prompt, **options)).result()


def _drop_costliest(keep: np.ndarray, names: Sequence[str], cost: Callable[[int], float | None],
                    over: Callable[[dict[int, float]], bool], reason: Callable[[int, dict[int, float]], str],
                    dropped: dict[str, str]) -> None:
    """The budget rule: while the kept experts' known costs ``{i: cost(i)}`` are ``over`` the budget, drop the
    costliest (``keep[i] = False``, ``dropped[name] = reason(i, costs)``). One expert is always kept, and an
    expert of unknown cost (None) is never dropped by it."""
    while keep.sum() > 1:
        est = {i: float(c) for i in np.flatnonzero(keep) if (c := cost(i)) is not None}
        if not est or not over(est):
            return
        i = max(est, key=est.get)
        keep[i] = False
        dropped[names[i]] = reason(i, est)


@dataclass(frozen=True)
class _StepBound:
    """A step's wall-clock bound: the timeout, or the time left when the deadline is nearer (``by_deadline``)."""

    limit: float
    by_deadline: bool


@dataclass(frozen=True)
class _Answer:
    """One expert's answer to a step: its next-token distribution, the prompt's length in its tokens (None: the
    server did not say) and the seconds it took."""

    top: dict[str, float]
    prompt_tokens: int | None
    seconds: float


@dataclass
class _Answers:
    """The answers to one step: the experts that answered (indices) with their distributions, in order, and
    whether one was dropped because the deadline came first."""

    experts: list[int] = field(default_factory=list)
    tops: list[dict[str, float]] = field(default_factory=list)
    late: bool = False


class _Run:
    """One request's state between the steps of :meth:`Coordinator.astream`."""

    def __init__(self, coord: Coordinator, prompt: Prompt, max_tokens: int, temperature: float,
                 seed: int | None, stop: Sequence[str]):
        self.t0 = time.monotonic()
        self.prompt, self.max_tokens, self.temperature, self.stop = prompt, max_tokens, temperature, stop
        self.names = [e.name for e in coord.experts]
        rendered = coord.expert_prompts(prompt)
        self.prompts = {n: p for n, (p, _) in rendered.items()}
        self.formats = {n: f for n, (_, f) in rendered.items()}
        self.g, self.alive, self.dropped = coord.plan(prompt, max_tokens)
        self.selected = [self.names[i] for i in np.flatnonzero(self.alive)]
        self.costs = coord._costs()
        self.rng = np.random.default_rng(seed)
        self.measured: dict[str, float] = {}            # each expert's latest step time (reported)
        self.decode: dict[str, list[float]] = {}        # each expert's decode-step times (steps >= 1): its pace
        self.prompt_tokens: dict[str, int] = {}
        self.text, self.steps, self.finish = "", [], None
        self.energy = sum(self.costs[n].prompt_energy_j for n in self.selected if n in self.costs)

    def end(self, finish: str, dropped: Mapping[str, str]) -> None:
        self.finish = finish
        self.dropped.update(dropped)

    def extend(self, step: Step) -> None:
        """Record a step and add its piece to the text; the generation ends at the stop piece, at a stop string
        (cut from the text and from the step's piece) or after ``max_tokens`` steps."""
        self.steps.append(step)
        piece = step.text
        if piece == fusion.STOP:
            self.finish = "stop"
            return
        self.text += piece
        hit = [self.text.index(s) for s in self.stop if s and s in self.text]
        if hit:  # the stop string is cut from the text, and from this step's piece
            cut = min(hit)
            step.text = piece[:max(0, len(piece) - (len(self.text) - cut))]
            self.text = self.text[:cut]
            self.finish = "stop"
        elif step.index + 1 == self.max_tokens:
            self.finish = "length"

    def generation(self) -> Generation:
        have = [n for n in self.selected if n in self.costs]
        source = ("estimated:per-token profile x tokens" + ("" if len(have) == len(self.selected) else
                  f" (no estimate for {sorted(set(self.selected) - set(have))}: counted as 0)"))
        return Generation(self.prompt, self.text, self.steps, self.finish, time.monotonic() - self.t0, self.energy,
                          source, self.selected, self.dropped, self.prompt_tokens,
                          {n: self.formats[n] for n in self.selected})


def gate_from_gating(path, embed: Callable[[list[str]], np.ndarray] | None = None) -> Callable[[str], np.ndarray]:
    """``gate(prompt)`` from the gating stage: ``GatingNetwork.load(path).predict_proba(embed([prompt]))[0]``.

    ``embed`` must be the embedding the network was trained on (default: ``clustering.embed_texts``); the
    gate's K values follow the experts.json order, so pass the clients in that order.
    """
    from ..core.gating import GatingNetwork  # written by the gating stage

    if embed is None:
        from ..models.clustering import embed_texts

        def embed(texts):
            return embed_texts(texts, progress=False)
    net = GatingNetwork.load(path)
    return lambda prompt: np.asarray(net.predict_proba(embed([prompt])))[0]


def clients_from_urls(urls: str | Sequence[str], api: str = "openai",
                      chat_templates: str | Mapping[str, str] | None = None) -> list[ExpertClient]:
    """``"URL,URL"`` or ``name=URL,...`` into clients; ``chat_templates``: ``name=MODEL,...`` (a registered model
    or GGUF path per expert) whose GGUF chat template renders chat messages for that expert."""
    items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
    if not items:
        raise InputError("give at least one expert URL", param="experts")
    out = []
    for u in items:
        name, sep, url = u.partition("=")
        if not sep or "://" in name:  # a bare URL (which may itself contain "=")
            name, url = None, u
        out.append(ExpertClient(url, name or None, api))
    if isinstance(chat_templates, str):
        pairs = [t.strip().partition("=") for t in chat_templates.split(",") if t.strip()]
        if any(not sep or not n or not m for n, sep, m in pairs):
            raise InputError("give chat templates as name=MODEL,...", param="chat_templates")
        chat_templates = {n.strip(): m.strip() for n, _, m in pairs}
    for name, model in (chat_templates or {}).items():
        client = next((c for c in out if c.name == name), None)
        if client is None:
            raise InputError(f"no expert named {name!r}; experts: {[c.name for c in out]}", param="chat_templates")
        client.chat_template = chat.ChatTemplate.from_gguf(model)
    return out


