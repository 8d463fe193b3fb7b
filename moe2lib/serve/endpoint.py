"""The OpenAI-compatible HTTP endpoint of a :class:`~moe2lib.serve.coordinator.Coordinator`.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream`` optional), answered by fused
generation across the expert servers. A completion's prompt goes to every expert as it is; a chat's
messages are rendered for each expert in its own chat template (:mod:`moe2lib.serve.chat`). ``usage`` counts the
prompt in tokens as the experts read it (the longest of their tokenisations: each expert has its own
tokenizer; all of them are in ``moe2.prompt_tokens``) and the answer in fused steps (one chosen string each).
Every request is checked before any expert is asked (:func:`parse_request`): a bad body gets 400, one over
the body limit 413, one beyond the concurrency limit 429, and all experts down 503.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from starlette.requests import Request  # FastAPI resolves the endpoints' annotations in this module

from ..errors import InputError, check_int
from .chat import check_messages
from .coordinator import AllExpertsFailed, Coordinator, Generation, Prompt


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


def _is_finite(x) -> bool:
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
        prompt = check_messages(body.get("messages"))
        text, what = "".join(m["content"] for m in prompt), "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt must be a non-empty string", param="prompt")
        text, what = prompt, "prompt"
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"{what} has {len(text)} characters; the limit is {limits.max_prompt_chars}", param=what)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # "\ud800" escapes: no UTF-8 for the experts
        raise InputError(f"{what} holds an unpaired surrogate (not valid Unicode text)", param=what)
    n = body.get("max_tokens")
    n = check_int(min(16, limits.max_tokens) if n is None else n, "max_tokens", high=limits.max_tokens)
    t = body.get("temperature", 0.0)
    t = 0.0 if t is None else t
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not _is_finite(t) or t < 0:
        raise InputError("temperature must be a finite number >= 0", param="temperature")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > limits.max_stop:
        raise InputError(f"stop must be a string or a list of at most {limits.max_stop} strings", param="stop")
    seed = body.get("seed", 0)
    seed = check_int(0 if seed is None else seed, "seed", low=0, high=2 ** 63 - 1)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InputError("stream must be true or false", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), (bool, type(None))):
        raise InputError("stream_options must be an object with include_usage true or false",
                         param="stream_options")
    return ParsedRequest(prompt, dict(max_tokens=n, temperature=float(t), seed=seed, stop=stop), bool(stream),
                         bool(stream) and bool(so.get("include_usage")))


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
            coordinator.expert_prompts(req.prompt)  # a conversation an expert's template refuses: 400 before a stream
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
                    "selected": gen.selected, "dropped": gen.dropped, "prompt_tokens": gen.prompt_tokens,
                    "prompt_format": gen.prompt_format,
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
                    if req.include_usage:  # as OpenAI: one more chunk, no choices, the usage
                        tail = {"id": cid, "object": kind + (".chunk" if chat else ""), "created": created,
                                "model": model_name, "choices": [], "usage": usage(gen)}
                        yield f"data: {json.dumps(tail)}\n\n"
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
                "usage": usage(gen), "moe2": info(gen)}

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
