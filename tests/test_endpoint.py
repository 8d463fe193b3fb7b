"""The OpenAI-compatible endpoint over real llama-cpp-python expert servers (SmolLM2 with its ChatML template,
Gemma-3-270M without one), driven by the official ``openai`` client over HTTP (uvicorn on a loopback port).

Usage is checked against token counts made here from the GGUFs (llama.cpp's tokenizer, in-process), the chat
prompt against transformers' rendering of the model's own template and against the expert server's own
``/v1/chat/completions``.
"""

import json
import threading
import time

import httpx
import pytest

from moe2lib.errors import InputError
from moe2lib.serve import servers
from moe2lib.serve.coordinator import Coordinator
from moe2lib.serve.endpoint import Limits, make_app

pytestmark = pytest.mark.slow
PROMPT = "Question: What is the capital of France?\nAnswer:"
CHAT = [{"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a primary colour."}]
LIMITS = Limits(max_prompt_chars=200, max_tokens=8, max_concurrency=1, max_body_bytes=2000)


def n_tokens(pool, name, text):
    """``text``'s length in the expert's own tokens as its completion server reads it (BOS where the model adds
    one; special-token text as special tokens)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(pool[name].spec.model_path()), vocab_only=True, verbose=False)
    try:
        return len(llm.tokenize(text.encode(), add_bos=True, special=True))
    finally:
        llm.close()


@pytest.fixture(scope="module")
def served(pool):
    """(the endpoint's base URL, its coordinator over smol and gemma), served by uvicorn on a free port."""
    import uvicorn

    coord = Coordinator(pool.clients(("smol", "gemma")), top_n=8)
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(coord, LIMITS), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30 and thread.is_alive(), "the endpoint did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", coord
    server.should_exit = True
    thread.join(20)
    assert not thread.is_alive()


@pytest.fixture
def client(served):
    import openai

    return openai.OpenAI(base_url=served[0], api_key="none", max_retries=0, timeout=300)


def test_completion_and_its_stream_with_usage(client, pool):
    r = client.completions.create(model="moe2", prompt=PROMPT, max_tokens=4)
    moe2 = r.model_extra["moe2"]
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == "".join(s["text"] for s in moe2["steps"]) and len(moe2["steps"]) == 4
    assert moe2["steps"][0]["experts"] == ["smol", "gemma"] and moe2["energy_source"].startswith("estimated")
    # usage: the prompt in the experts' own tokens (the longer one), the answer in fused steps
    real = {n: n_tokens(pool, n, PROMPT) for n in ("smol", "gemma")}
    assert real["gemma"] == real["smol"] + 1  # Gemma's tokenizer adds a BOS, SmolLM2's does not
    assert moe2["prompt_tokens"] == real and moe2["prompt_format"] == {"smol": "text", "gemma": "text"}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        real["gemma"], 4, real["gemma"] + 4)

    chunks = list(client.completions.create(model="moe2", prompt=PROMPT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == real["gemma"]
    last = chunks[-2].model_extra["moe2"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "".join(s["text"] for s in last["steps"])
    assert chunks[-1].usage.completion_tokens == len(last["steps"]) == 3
    assert all(c.model_extra["moe2"]["experts"] == ["smol", "gemma"] for c in chunks[:-2])


def test_chat_renders_each_experts_own_template(client, served, pool):
    from transformers.utils.chat_template_utils import render_jinja_template

    coord = served[1]
    prompts = coord.expert_prompts(CHAT)
    smol, template = prompts["smol"][0], pool["smol"].client().chat_template
    # SmolLM2's GGUF template (ChatML), rendered as transformers renders it, special tokens and all
    assert smol == render_jinja_template([CHAT], chat_template=template.source, add_generation_prompt=True,
                                         bos_token=template.bos_token, eos_token=template.eos_token)[0][0]
    assert smol == ("<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n"
                    "Name a primary colour.<|im_end|>\n<|im_start|>assistant\n")
    # Gemma-3-270M (a base model) has no chat template in its GGUF: the plain transcript
    assert prompts["gemma"] == ("System: You answer in one word.\nUser: Name a primary colour.\nAssistant:",
                                "transcript")

    r = client.chat.completions.create(model="moe2", messages=CHAT, max_tokens=3)
    moe2 = r.model_extra["moe2"]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "".join(s["text"] for s in moe2["steps"])
    assert moe2["prompt_format"] == {"smol": "chat_template", "gemma": "transcript"}
    # the expert server's own chat endpoint reads the conversation as the same number of tokens
    own = httpx.post(pool["smol"].url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1},
                     timeout=120).json()
    real = {"smol": n_tokens(pool, "smol", smol), "gemma": n_tokens(pool, "gemma", prompts["gemma"][0])}
    assert moe2["prompt_tokens"] == real and real["smol"] == own["usage"]["prompt_tokens"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        max(real.values()), len(moe2["steps"]), max(real.values()) + len(moe2["steps"]))

    stream = client.chat.completions.create(model="moe2", messages=CHAT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == max(real.values()) and chunks[-1].choices == []
    steps = chunks[-2].model_extra["moe2"]["steps"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "".join(s["text"] for s in steps)
    assert chunks[-1].usage.completion_tokens == len(steps)


def test_errors_400_413_429(client, served):
    import openai

    with pytest.raises(openai.BadRequestError, match="max_tokens") as info:
        client.completions.create(model="moe2", prompt="Hi", max_tokens=9)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]"):
        client.chat.completions.create(model="moe2", messages=[{"role": "robot", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="messages has 201 characters"):
        client.chat.completions.create(model="moe2", messages=[{"role": "user", "content": "x" * 201}])
    with pytest.raises(openai.APIStatusError, match="limit is 2000") as info:
        client.completions.create(model="moe2", prompt="x" * 2100)
    assert info.value.status_code == 413
    # one request in flight (a stream being read) is the limit: the next one is refused with Retry-After
    with client.completions.create(model="moe2", prompt=PROMPT, max_tokens=2, stream=True) as held:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="moe2", prompt="Hi", max_tokens=1)
        assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
        assert list(held)[-1].choices[0].finish_reason in ("length", "stop")
    r = client.completions.create(model="moe2", prompt="Hi", max_tokens=1)  # released again
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens == 1


def test_endpoint_limits_and_bad_bodies(served):
    """Beyond the openai client: chunked bodies, bad bytes, NaN, surrogates (the app in-process)."""
    from fastapi.testclient import TestClient

    api = TestClient(make_app(served[1], Limits(max_prompt_chars=200, max_tokens=8, max_body_bytes=2000)))
    assert api.get("/v1/models").json()["data"][0]["experts"] == ["smol", "gemma"]
    big = json.dumps({"prompt": "x" * 100, "stop": ["y" * 1000] * 3}).encode()
    r = api.post("/v1/chat/completions", content=iter([big[:1000], big[1000:]]))  # chunked: no Content-Length
    assert r.status_code == 413 and "2000" in r.json()["error"]["message"]
    for bad, what in [(b"\xff\xfe", "not valid JSON"), (b'{"prompt": "hi", "temperature": NaN}', "not valid JSON"),
                      (b'{"prompt": "\\ud800"}', "surrogate"), (b'{"prompt": ""}', "prompt"),
                      (b'{"prompt": "hi", "stream": true, "stream_options": 3}', "stream_options")]:
        r = api.post("/v1/completions", content=bad)
        assert r.status_code == 400 and what in r.json()["error"]["message"], (bad, r.text)
    r = api.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})  # none of that left it busy
    assert r.status_code == 200, r.text


def test_limits_are_checked():
    with pytest.raises(InputError, match="max_body_bytes"):
        Limits(max_body_bytes=0)
