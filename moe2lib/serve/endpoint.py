"""The OpenAI-compatible HTTP endpoint of a :class:`~moe2lib.serve.coordinator.Coordinator`.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream`` optional), answered by fused
generation across the expert servers. A completion's prompt goes to every expert as it is; a chat's
messages are rendered for each expert in its own chat template (:mod:`moe2lib.serve.chat`). ``usage`` counts the
prompt in tokens as the experts read it (the longest of their tokenisations: each expert has its own
tokenizer; all of them are in ``moe2.prompt_tokens``) and the answer in fused steps (one chosen string each).
Every request is checked before any expert is asked (:func:`parse_request`, the bodies as the pydantic models
:class:`CompletionRequest` and :class:`ChatRequest`): a bad body gets 400, one over the body limit 413, one beyond
the concurrency limit 429, and all experts down 503.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Annotated

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      ValidationInfo, field_validator)
from starlette.background import BackgroundTask
from starlette.requests import Request  # FastAPI resolves the endpoints' annotations in this module
from starlette.responses import JSONResponse, StreamingResponse

from ..errors import InputError, check_int
from .chat import check_messages
from .coordinator import AllExpertsFailed, Coordinator, Generation, Prompt, Step


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
            check_int(getattr(self, name), name)


class BodyTooLarge(InputError):
    """The HTTP request body is over :attr:`Limits.max_body_bytes` (HTTP 413)."""


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: the prompt (a text, or chat messages), :meth:`Coordinator.astream`'s options, streaming
    or not, and whether a streamed answer ends with a ``usage`` chunk (``stream_options.include_usage``)."""

    prompt: Prompt
    options: dict
    stream: bool
    include_usage: bool = False


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits", Limits())


def _check_text(text: str, what: str, limits: Limits) -> None:
    """InputError when the prompt's text (``what``: prompt, or the messages' contents) is over the limit or holds
    an unpaired surrogate."""
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"{what} has {len(text)} characters; the limit is {limits.max_prompt_chars}", param=what)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # "\ud800" escapes: no UTF-8 for the experts
        raise InputError(f"{what} holds an unpaired surrogate (not valid Unicode text)", param=what)


class StreamOptions(BaseModel):
    """``stream_options``: whether a streamed answer ends with a ``usage`` chunk."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class RequestOptions(BaseModel):
    """The generation options of a request body, as JSON types exactly (no "8" for 8, no true for 1); the keys it
    does not name (``model``, ``n``, ...) are ignored. The limits come from the validation context
    (``{"limits": Limits}``)."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: StrictInt | None = None                # None: 16, or the limit when it is lower
    temperature: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = 0.0
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, lt=2 ** 63)] | None = 0
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", "stream_options", mode="before")
    @classmethod
    def _falsy_is_none(cls, value):
        """A falsy ``stop`` or ``stream_options`` ("", 0, false, [], {}) means none."""
        return value or None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_within_limit(cls, n, info: ValidationInfo):
        if n is not None and not 1 <= n <= _limits(info).max_tokens:
            raise ValueError("over the limit")
        return n

    @field_validator("stop")
    @classmethod
    def _stops_within_limit(cls, stop, info: ValidationInfo):
        if isinstance(stop, list) and len(stop) > _limits(info).max_stop:
            raise ValueError("over the limit")
        return stop

    def options(self, limits: Limits) -> dict:
        """:meth:`Coordinator.astream`'s options."""
        return dict(max_tokens=min(16, limits.max_tokens) if self.max_tokens is None else self.max_tokens,
                    temperature=0.0 if self.temperature is None else float(self.temperature),
                    seed=0 if self.seed is None else self.seed,
                    stop=[self.stop] if isinstance(self.stop, str) else self.stop or [])

    def include_usage(self) -> bool:
        """Whether the answer, a stream, ends with a ``usage`` chunk."""
        return bool(self.stream) and self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(RequestOptions):
    """A ``/v1/completions`` body: a non-empty prompt (a list of one prompt is that prompt) and the options."""

    prompt: StrictStr  # (a min_length would refuse a surrogate as "not a string", before it is named)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    @field_validator("prompt")
    @classmethod
    def _prompt_within_limit(cls, prompt, info: ValidationInfo):
        if not prompt:
            raise ValueError("empty")
        _check_text(prompt, "prompt", _limits(info))
        return prompt


class ChatRequest(RequestOptions):
    """A ``/v1/chat/completions`` body: messages as :func:`~moe2lib.serve.chat.check_messages` takes them, and the
    options."""

    messages: list[dict[str, str]]

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_within_limit(cls, value, info: ValidationInfo):
        messages = check_messages(value)  # InputError naming the bad message
        _check_text("".join(m["content"] for m in messages), "messages", _limits(info))
        return messages


# what a field that fails its type (or its limit) is told; a validator's own InputError says more
_FAULTS = {
    "prompt": "prompt must be a non-empty string",
    "messages": "messages must be a non-empty list",
    "max_tokens": "max_tokens must be an integer in [1, {limits.max_tokens}]",
    "temperature": "temperature must be a finite number >= 0",
    "stop": "stop must be a string or a list of at most {limits.max_stop} strings",
    "seed": "seed must be an integer in [0, 2^63)",
    "stream": "stream must be true or false",
    "stream_options": "stream_options must be an object with include_usage true or false",
}


def _first_fault(exc: ValidationError, text_field: str, limits: Limits) -> InputError:
    """The InputError of a body's first fault: the prompt's (``text_field``), else the first option's."""
    error = min(exc.errors(), key=lambda e: e["loc"][:1] != (text_field,))
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):
        return cause
    field = str(error["loc"][0]) if error["loc"] else None
    if field not in _FAULTS:
        return InputError("the request body must be a JSON object")
    return InputError(_FAULTS[field].format(limits=limits), param=field)


def parse_request(raw: bytes | str, chat: bool, limits: Limits = Limits()) -> ParsedRequest:
    """Check a ``/v1/completions`` (``chat=False``, :class:`CompletionRequest`) or ``/v1/chat/completions``
    (:class:`ChatRequest`) body; InputError says what is wrong.

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
    kind, text_field = (ChatRequest, "messages") if chat else (CompletionRequest, "prompt")
    try:
        req = kind.model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        raise _first_fault(exc, text_field, limits) from None
    return ParsedRequest(getattr(req, text_field), req.options(limits), bool(req.stream), req.include_usage())


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


def usage(gen: Generation) -> dict:
    """OpenAI's ``usage`` of a generation: the prompt in the experts' tokens (the longest of their tokenisations;
    None when no expert said), the answer in fused steps."""
    prompt = max(gen.prompt_tokens.values()) if gen.prompt_tokens else None
    done = len(gen.steps)
    return {"prompt_tokens": prompt, "completion_tokens": done,
            "total_tokens": None if prompt is None else prompt + done}


def _record(gen: Generation) -> dict:
    """The answer's ``moe2`` field: delay, energy, the experts selected and dropped, each expert's prompt tokens and
    format, and every fused step (its text, experts and weights)."""
    return {"delay_s": gen.delay_s, "energy_j": gen.energy_j, "energy_source": gen.energy_source,
            "selected": gen.selected, "dropped": gen.dropped, "prompt_tokens": gen.prompt_tokens,
            "prompt_format": gen.prompt_format,
            "steps": [{"text": s.text, "experts": s.experts, "weights": s.weights} for s in gen.steps]}


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error(status: int, msg: str) -> JSONResponse:
    """OpenAI's error body; a 429 or 503 says to try again in a second."""
    return JSONResponse({"error": {"message": msg, "type": "invalid_request_error" if status < 500
                                   else "server_error"}}, status_code=status,
                        headers={"Retry-After": "1"} if status in (429, 503) else None)


@dataclass(frozen=True)
class _Reply:
    """The JSON of one request's answer (a text or a chat completion, whole or as stream chunks)."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> "_Reply":
        return cls(chat, model, f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}", int(time.time()))

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model}

    def _choice(self, text: str, finish: str | None, delta: bool = False) -> dict:
        if self.chat:
            msg = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def completion(self, gen: Generation) -> dict:
        """The whole answer."""
        return {**self._head(False), "choices": [self._choice(gen.text, gen.finish_reason)], "usage": usage(gen),
                "moe2": _record(gen)}

    def step_event(self, step: Step) -> str:
        """A stream's chunk of one fused step."""
        return _event({**self._head(True), "choices": [self._choice(step.text, None, True)],
                       "moe2": {"experts": step.experts, "weights": step.weights}})

    def last_event(self, gen: Generation) -> str:
        """A stream's last chunk: the finish reason and the generation's record."""
        return _event({**self._head(True), "choices": [self._choice("", gen.finish_reason, True)],
                       "moe2": _record(gen)})

    def usage_event(self, gen: Generation) -> str:
        """As OpenAI, after the last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return _event({**self._head(True), "choices": [], "usage": usage(gen)})


def _stream(coordinator: Coordinator, req: ParsedRequest, reply: _Reply, slots: asyncio.Semaphore):
    """The answer as server-sent events: a chunk per fused step, the last chunk, the usage when asked, then
    ``[DONE]``; a failure midway ends it with an error event instead of a cut. The request's place in ``slots`` is
    given back when the stream ends, or after the response for a stream that never started."""
    started = False

    async def events():
        nonlocal started
        started = True
        out: dict = {}
        try:
            async for step in coordinator.astream(req.prompt, result=out, **req.options):
                yield reply.step_event(step)
            yield reply.last_event(out["generation"])
            if req.include_usage:
                yield reply.usage_event(out["generation"])
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not a cut
            yield _event({"error": {"message": f"{type(exc).__name__}: {exc}"}})
        finally:
            slots.release()
        yield "data: [DONE]\n\n"

    def release_if_unstarted():  # a stream that never ran never reaches its finally
        if not started:
            slots.release()

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release_if_unstarted))


def make_app(coordinator: Coordinator, limits: Limits = Limits(), model_name: str = "moe2"):
    """FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream`` optional).

    Bad requests get 400 (413 for a body over ``limits.max_body_bytes``), more than ``limits.max_concurrency``
    at once 429 (an ``asyncio.Semaphore`` that refuses instead of queueing), all experts down 503. Serve it on
    127.0.0.1 (``python -m moe2lib serve`` does by default): it has no authentication.
    """
    from fastapi import FastAPI

    app = FastAPI(title="MoE2 coordinator", version="1")
    slots = asyncio.Semaphore(limits.max_concurrency)  # requests in flight, streams until their last event

    async def handle(request: Request, chat: bool):
        try:
            req = parse_request(await read_body(request, limits.max_body_bytes), chat, limits)
            coordinator.expert_prompts(req.prompt)  # a conversation an expert's template refuses: 400 before a stream
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        if slots.locked():
            return _error(429, f"busy: {limits.max_concurrency} requests in flight")
        await slots.acquire()  # returns at once (not locked), so concurrent streaming requests see each other
        reply = _Reply.new(chat, model_name)
        if req.stream:
            return _stream(coordinator, req, reply, slots)
        try:
            gen = await coordinator.agenerate(req.prompt, **req.options)
        except AllExpertsFailed as exc:
            return _error(503, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        finally:
            slots.release()
        return reply.completion(gen)

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
