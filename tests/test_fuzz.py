"""Fuzzing with hypothesis: inputs from outside (data files, request bodies, server answers, budgets) either
work or fail with the library's own error saying where; the maths keeps its invariants on any numbers.

Sections: data loaders, fusion maths, SMO, the coordinator's request parsing, a static safety audit.
Kept under a minute on 2 busy cores (modest ``max_examples``; no servers).
"""

from __future__ import annotations

import ast
import asyncio
import csv
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from moe2lib.core import fusion, gating, smo
from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.serve.coordinator import APIS, Coordinator, ExpertClient, ExpertFailed
from moe2lib.serve.endpoint import Limits, ParsedRequest, make_app, parse_request

from conftest import examples

REPO = Path(__file__).resolve().parents[1]
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ============================================================================ data loaders

cell = st.text(st.sampled_from(list("ab AD,\"\n\r\t\\é\x00\u2028\ufeff\ud800")), max_size=6)  # \ud800: bad bytes
csv_row = st.lists(st.one_of(cell, st.sampled_from(["A", "B", "C", "D", " B ", "E", ""])), max_size=8)


def _csv_text(rows, raw_lines):
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue() + "".join(line + "\n" for line in raw_lines)


def _assert_names_file_and_line(exc: InputError, path: Path, n_lines: int):
    assert exc.path is not None and Path(exc.path).name == path.name, str(exc)
    if "empty file" in str(exc):
        return  # a whole-file error
    assert exc.line is not None and 1 <= exc.line <= max(n_lines, 1), str(exc)
    assert f"{path.name}:{exc.line}" in str(exc)


@settings(max_examples=examples(120), **FAST)
@given(st.lists(csv_row, max_size=6), st.lists(cell, max_size=2))
@example([["q", "a", "b", "c", "d"]], ["\ud800"])  # a short row, then bad bytes: the row's line is named
def test_mmlu_csv_loads_or_names_the_first_bad_line(rows, raw_lines):
    raw = _csv_text(rows, raw_lines).encode("utf-8", "surrogatepass")
    lines = raw.splitlines(keepends=True)  # lines as csv reads them: \r ends one too
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmlu" / "test" / "fuzz_test.csv"
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        try:
            qs = loaders.load_mmlu("test", tmp)
        except InputError as exc:
            _assert_names_file_and_line(exc, path, len(lines))
            if "not UTF-8" in str(exc):  # the first line whose bytes are not UTF-8
                with pytest.raises(UnicodeDecodeError):
                    lines[exc.line - 1].decode("utf-8")
                b"".join(lines[:exc.line - 1]).decode("utf-8")
            elif exc.line is not None:  # a bad row: the rows before the line it starts on are fine
                path.write_bytes(b"".join(lines[:exc.line - 1]))
                try:
                    loaders.load_mmlu("test", tmp)
                except InputError as before:
                    assert "empty file" in str(before), (exc, before)
            return
    assert qs and all(len(q.choices) == 4 and q.answer in range(4) and q.question.strip() for q in qs)
    assert all(q.source.startswith("mmlu/test/fuzz_test.csv:") for q in qs)


@settings(max_examples=examples(60), **FAST)
@given(st.binary(max_size=30), st.integers(0, 50), st.sampled_from(["csv", "jsonl"]))
def test_arbitrary_bytes_load_or_name_the_file(junk, at, kind):
    good = (b"What is 2+2?,1,2,3,4,D\nWhat is 1+1?,1,2,3,4,B\n" if kind == "csv" else
            b'{"query": "2+2?", "choices": ["3", "4"], "gold": 1}\n'
            b'{"query": "1+1?", "choices": ["2", "3"], "gold": 0}\n')
    raw = good[:at] + junk + good[at:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmlu" / "test" / f"fuzz_test.{kind}"
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        try:
            qs = loaders.load_mmlu("test", tmp) if kind == "csv" else loaders.load_jsonl(path)
        except InputError as exc:
            assert exc.path is not None and Path(exc.path).name == path.name, str(exc)
            if "empty file" in str(exc):
                assert exc.line is None
            else:  # bytes that are not UTF-8 are named by their line too
                assert exc.line is not None and 1 <= exc.line <= raw.count(b"\n") + raw.count(b"\r") + 1, str(exc)
            return
    assert qs and all(0 <= q.answer < len(q.choices) for q in qs)


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids,
                                                                                      max_size=4), max_leaves=10)
jsonl_obj = st.fixed_dictionaries({}, optional={
    "query": st.one_of(st.text(max_size=6), json_value), "question": st.text(max_size=6),
    "choices": st.one_of(st.lists(st.text(max_size=3), max_size=5), json_value),
    "gold": st.one_of(st.integers(-2, 6), st.sampled_from(["A", "b", " C ", "Z", "AB", ""]), json_value),
    "answer": st.one_of(st.integers(-1, 5), json_value)})
jsonl_line = st.one_of(jsonl_obj.map(json.dumps), json_value.map(json.dumps),
                       st.text(st.characters(blacklist_characters="\n"), max_size=12),
                       st.just(""), st.just("  "))


@settings(max_examples=examples(150), **FAST)
@given(st.lists(jsonl_line, max_size=6))
@example(["{}", "\ud800"])  # line 1 lacks its fields, line 2 is not UTF-8: line 1 is named
def test_jsonl_loads_or_names_the_first_bad_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            qs = loaders.load_jsonl(path)
        except InputError as exc:
            _assert_names_file_and_line(exc, path, len(lines))
            if exc.line is not None:  # the lines before the one named are fine on their own
                path.write_text("\n".join(lines[:exc.line - 1]) + "\n", encoding="utf-8", errors="surrogatepass")
                try:
                    loaders.load_jsonl(path)
                except InputError as before:
                    assert "empty file" in str(before), (exc, before)
            return
    assert len(qs) == sum(1 for line in "\n".join(lines).split("\n") if line.strip())
    assert all(0 <= q.answer < len(q.choices) for q in qs)


@pytest.mark.parametrize("line", ['{"query": "q", "choices": ["a", "b"], "gold": ' + "9" * 5000 + "}",
                                  "[" * 100_000])
def test_jsonl_pathological_lines_are_input_errors(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:1"):
        loaders.load_jsonl(path)


# ============================================================================ fusion maths

any_gate = st.floats(0.0, 1.7e308, allow_subnormal=True)
token = st.one_of(st.sampled_from(["a", "ab", " the", " t", "\n", fusion.STOP]), st.text(max_size=3))
prob = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 5e-324, 1e-300, 1.0]))


@settings(max_examples=examples(200), **FAST)
@given(st.lists(any_gate, min_size=1, max_size=8), st.data())
def test_subset_weights_are_a_distribution_on_the_subset(g, draw):
    mask = np.array(draw.draw(st.lists(st.booleans(), min_size=len(g), max_size=len(g))))
    assume(mask.any())
    w = gating.subset_weights(g, mask)
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(w[~mask] == 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    # many prompts at once (one of them this one) give this prompt the same weights
    np.testing.assert_array_equal(gating.subset_weights(np.stack([g, np.ones(len(g))]), mask)[0], w)


@settings(max_examples=examples(200), **FAST)
@given(st.lists(st.floats(0.0, 1e6), min_size=1, max_size=8), st.integers(1, 10), st.data())
def test_topk_mask_picks_the_k_largest_of_the_subset(g, k, draw):
    mask = np.array(draw.draw(st.lists(st.booleans(), min_size=len(g), max_size=len(g))))
    keep = gating.topk_mask(g, k, mask)
    g = np.asarray(g)
    assert not (keep & ~mask).any() and keep.sum() == min(k, mask.sum())
    if keep.any() and (mask & ~keep).any():
        assert g[keep].min() >= g[mask & ~keep].max()


@settings(max_examples=examples(200), **FAST)
@given(st.lists(st.dictionaries(token, prob, min_size=1, max_size=5), min_size=1, max_size=4), st.data(),
       st.sampled_from(fusion.REMAINDERS), st.booleans(),
       st.one_of(st.just(0.0), st.floats(1e-320, 1e6), st.sampled_from([5e-324, 1e-310, 1e300])))
def test_fused_is_a_distribution_and_choose_picks_a_candidate(tops, draw, remainder, prefix, temperature):
    g = draw.draw(st.lists(any_gate, min_size=len(tops), max_size=len(tops)))
    w = gating.subset_weights(g, [True] * len(tops))
    try:
        f = fusion.fuse_text(w, tops, remainder=remainder, prefix=prefix,
                        vocab_sizes=draw.draw(st.lists(st.one_of(st.none(), st.integers(1, 300_000)),
                                                       min_size=len(tops), max_size=len(tops))))
    except InputError as exc:  # only an expert whose top-n carries no probability at all is refused
        assert exc.param == "top" and any(sum(t.values()) <= 0 for t in tops)
        return
    assert set(f.candidates) == set().union(*tops) and len(f.candidates) == len(f.probs)
    assert np.all(np.isfinite(f.probs)) and np.all(f.probs >= 0) and f.probs.sum() == pytest.approx(1.0)
    piece = fusion.choose(f, temperature, np.random.default_rng(0))
    assert piece in f.candidates
    if temperature == 0:
        assert f.probs[f.candidates.index(piece)] == f.probs.max()


@settings(max_examples=examples(150), **FAST)
@given(st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.floats(), st.integers(-10**6, 10**6),
                                                      st.text(max_size=2)), max_size=5),
       st.sampled_from([None, "stop", "length"]))
def test_a_server_answer_is_a_distribution_or_an_expert_failure(top_logprobs, finish):
    """Whatever a server sends as top_logprobs, the coordinator gets a distribution or drops the expert."""
    js = {"choices": [{"logprobs": {"top_logprobs": [top_logprobs]}, "finish_reason": finish}]}
    try:
        got = APIS["openai"].parse(js)
    except ExpertFailed:
        return
    assert got and all(math.isfinite(v) and v >= 0 for v in got.values()) and sum(got.values()) > 0
    fusion.fuse_text([1.0], [got])  # and the fusion maths accepts it


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=4)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)
_ENTRY = st.dictionaries(st.sampled_from(["token", "logprob", "tok_str", "prob", "x"]), _JSON, max_size=3)


@settings(max_examples=examples(150), **FAST)
@given(st.one_of(_JSON, st.fixed_dictionaries({}, optional={
    "completion_probabilities": st.lists(st.dictionaries(st.sampled_from(["top_logprobs", "probs"]),
                                                         st.lists(_ENTRY, max_size=3), max_size=2), max_size=2),
    "stop": st.booleans()})))
def test_a_llama_server_answer_is_a_distribution_or_an_expert_failure(js):
    """The same for llama.cpp's own /completion answers: malformed ones drop the expert, nothing else escapes."""
    try:
        got = APIS["llama-server"].parse(js)
    except ExpertFailed:
        return
    assert got and all(math.isfinite(v) and v >= 0 for v in got.values()) and sum(got.values()) > 0


# ============================================================================ SMO


def monotone_loss(values: np.ndarray, K: int):
    """L(S) = min over T ⊆ S of values[T]: monotone non-increasing (subset-min by a zeta transform)."""
    L = values.copy()
    for b in range(K):
        bit = 1 << b
        idx = np.arange(1 << K)
        has = (idx & bit) != 0
        L[has] = np.minimum(L[has], L[idx[has] ^ bit])
    weights = 1 << np.arange(K)
    return lambda masks: L[np.asarray(masks, dtype=np.int64) @ weights]


cost = st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, 1.0, 5.0]))
budget = st.one_of(st.floats(0.0, 200.0), st.sampled_from([0.0, 1.0, 10.0, math.inf]))


@settings(max_examples=examples(100), **FAST)
@given(st.integers(1, 10), st.data(), budget, budget, st.booleans())
def test_smo_is_feasible_and_never_worse_than_exhaustive(K, draw, D, E, monotone):
    d = np.array(draw.draw(st.lists(cost, min_size=K, max_size=K)))
    e = np.array(draw.draw(st.lists(cost, min_size=K, max_size=K)))
    seed = draw.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 5, 1 << K).astype(float) if seed % 2 else rng.random(1 << K)
    loss = monotone_loss(values, K) if monotone else (lambda masks: values[np.asarray(masks, np.int64)
                                                                            @ (1 << np.arange(K))])
    got = smo.select_subset(loss, d, e, D, E)
    ref = smo.exhaustive_subset(loss, d, e, D, E)
    assert got.feasible == ref.feasible
    if not got.feasible:
        assert not got.mask.any() and got.loss == math.inf
        return
    assert got.mask.any() and smo.subset_delay(got.mask, d) <= D and smo.subset_energy(got.mask, e) <= E
    assert got.loss == loss(got.mask[None, :])[0]
    shown = np.array(draw.draw(st.lists(st.lists(st.booleans(), min_size=K, max_size=K), max_size=5)),
                     dtype=bool).reshape(-1, K)
    shown = shown[shown.any(1) & (smo.subset_delay(shown, d) <= D) & (smo.subset_energy(shown, e) <= E)]
    if monotone:  # exact for a monotone loss (Theorem 2): no feasible subset is better
        assert got.loss <= ref.loss
        assert all(got.loss <= v for v in loss(shown))


bad_number = st.sampled_from([math.nan, -1.0, -math.inf, "x", None, [1.0], complex(1, 1)])


@settings(max_examples=examples(60), **FAST)
@given(st.sampled_from(["delay_budget", "energy_budget", "delay", "energy"]), bad_number)
def test_smo_bad_budgets_and_costs_name_the_parameter(param, bad):
    args = dict(delay=np.array([1.0, 2.0]), energy=np.array([1.0, 1.0]), delay_budget=3.0, energy_budget=3.0)
    args[param] = bad if param.endswith("budget") else np.array([1.0, bad], dtype=object)
    loss = lambda m: -np.asarray(m).sum(1).astype(float)  # noqa: E731
    for fn in (smo.select_subset, smo.exhaustive_subset, smo.greedy_subset):
        with pytest.raises(InputError) as info:
            fn(loss, args["delay"], args["energy"], args["delay_budget"], args["energy_budget"])
        assert info.value.param == param


# ============================================================================ request parsing

LIMITS = Limits(max_prompt_chars=50, max_tokens=8, max_concurrency=2, max_body_bytes=600, max_stop=3)
field_value = st.one_of(json_value, st.integers(-3, 12), st.floats(-1, 3), st.text(max_size=60),
                        st.lists(st.text(max_size=4), max_size=5), st.just(True))
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "robot", 1]),
                                              "content": st.one_of(st.text(max_size=20), json_value)})
request_obj = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=10), max_size=2), field_value),
    "messages": st.one_of(st.lists(message, max_size=3), field_value),
    "max_tokens": field_value, "temperature": field_value, "stop": field_value, "seed": field_value,
    "stream": field_value, "model": field_value,
    "stream_options": st.one_of(field_value, st.fixed_dictionaries({}, optional={"include_usage": field_value}))})
body = st.one_of(request_obj.map(json.dumps), json_value.map(json.dumps), st.text(max_size=40),
                 st.sampled_from(['{"prompt": "hi", "temperature": NaN}', '{"prompt": "hi", "max_tokens": 1e400}',
                                  '{"prompt": "\\ud800"}', '{"prompt": "hi", "temperature": ' + "9" * 400 + "}",
                                  "[" * 5000, '{"prompt": "hi", "seed": ' + "9" * 30 + "}"]))
raw_body = st.one_of(body.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=40))


def _check_parsed(req: ParsedRequest, limits: Limits):
    if isinstance(req.prompt, str):
        text = req.prompt
        assert text
    else:  # chat messages
        assert req.prompt and all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                                  and isinstance(m["content"], str) for m in req.prompt)
        text = "".join(m["content"] for m in req.prompt)
    assert len(text) <= limits.max_prompt_chars
    text.encode("utf-8")  # the experts can be sent it
    o = req.options
    assert type(o["max_tokens"]) is int and 1 <= o["max_tokens"] <= limits.max_tokens
    assert type(o["temperature"]) is float and math.isfinite(o["temperature"]) and o["temperature"] >= 0
    assert isinstance(o["stop"], list) and len(o["stop"]) <= limits.max_stop and all(isinstance(s, str)
                                                                                      for s in o["stop"])
    assert type(o["seed"]) is int and 0 <= o["seed"] < 2**63 and type(req.stream) is bool
    assert type(req.include_usage) is bool and (req.stream or not req.include_usage)


@settings(max_examples=examples(400), **FAST)
@given(raw_body, st.booleans())
def test_request_parser_gives_a_valid_request_or_an_input_error(raw, chat):
    try:
        req = parse_request(raw, chat, LIMITS)
    except InputError as exc:
        assert str(exc)
        return
    _check_parsed(req, LIMITS)


def test_request_parser_known_cases():
    ok = parse_request(b'{"prompt": ["Hi"], "max_tokens": 8, "stop": "x", "temperature": 1}', False, LIMITS)
    assert ok == ParsedRequest("Hi", dict(max_tokens=8, temperature=1.0, seed=0, stop=["x"]), False)
    chat = parse_request(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": True}), True, LIMITS)
    assert chat.prompt == [{"role": "user", "content": "Hi"}] and chat.stream and not chat.include_usage
    assert chat.options["max_tokens"] == 8  # the default (16) within a lower limit
    usage = parse_request(json.dumps({"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}}),
                          False, LIMITS)
    assert usage.include_usage and not parse_request(b'{"prompt": "Hi", "stream_options": {"include_usage": true}}',
                                                     False, LIMITS).include_usage  # (only a stream has the chunk)
    for raw, param in [('{"prompt": "hi", "max_tokens": true}', "max_tokens"),
                       ('{"prompt": "hi", "max_tokens": 9}', "max_tokens"),
                       ('{"prompt": "hi", "temperature": 1e999}', None),   # json: inf; not a finite number
                       ('{"prompt": "hi", "temperature": -0.5}', "temperature"),
                       ('{"prompt": "hi", "stop": ["a", "b", "c", "d"]}', "stop"),
                       ('{"prompt": "hi", "stream": "yes"}', "stream"),
                       ('{"prompt": ""}', "prompt"), ('{"prompt": "' + "x" * 51 + '"}', "prompt"),
                       ('{"prompt": "hi", "stream_options": {"include_usage": 1}}', "stream_options")]:
        with pytest.raises(InputError) as info:
            parse_request(raw, False, LIMITS)
        if param:
            assert info.value.param == param, raw
    with pytest.raises(InputError, match="600"):
        parse_request(b" " * 601, False, LIMITS)


@pytest.fixture(scope="module")
def dead_app():
    """The endpoint over one expert at a closed port: every accepted request ends as "all experts failed"."""
    from moe2lib.serve.servers import free_port

    coord = Coordinator([ExpertClient(f"http://127.0.0.1:{free_port()}", "gone")], timeout=2)
    return make_app(coord, LIMITS)


@settings(max_examples=examples(60), **FAST)
@given(raw_body, st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.booleans())
def test_endpoint_answers_4xx_or_503_never_500(dead_app, raw, route, chunked):
    import httpx

    async def send():
        transport = httpx.ASGITransport(app=dead_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://moe2") as client:
            if chunked:  # no Content-Length: the body cap must hold while reading
                async def chunks():
                    for i in range(0, len(raw), 7):
                        yield raw[i:i + 7]
                return await client.post(route, content=chunks())
            return await client.post(route, content=raw)

    r = asyncio.run(send())
    assert r.status_code in (200, 400, 413, 503), (r.status_code, r.text)
    if r.status_code == 200:  # a stream that reports the failure in an error event, then [DONE]
        assert '"error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
    else:
        msg = r.json()["error"]["message"]
        assert msg and (r.status_code != 503 or "all experts failed" in msg)
        assert (r.status_code == 413) == (len(raw) > LIMITS.max_body_bytes)


# ============================================================================ static safety audit

def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe deserialisation, remote code, shell and all-interfaces patterns in Python source (by AST, so
    comments and docstrings do not count): what the audit of this repository forbids."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"):
                    found.append(f"{where}: imports {m}")
        if isinstance(node, ast.Constant) and node.value == "0.0.0.0":
            found.append(f"{where}: binds 0.0.0.0")
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}

        def const(key):
            return kw[key].value if key in kw and isinstance(kw[key], ast.Constant) else "<unset>"

        if name == "load" and owner in ("np", "numpy") and const("allow_pickle") is not False:
            found.append(f"{where}: np.load without allow_pickle=False")
        if name == "load" and owner == "torch" and const("weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name == "load" and owner == "yaml":
            found.append(f"{where}: yaml.load (use yaml.safe_load)")
        if name in ("loads", "load") and owner in ("pickle", "dill", "joblib", "marshal"):
            found.append(f"{where}: {owner}.{name}")
        if const("trust_remote_code") is True or ("trust_remote_code" in kw and const("trust_remote_code")
                                                  not in (False, "<unset>")):
            found.append(f"{where}: trust_remote_code not False")
        if const("shell") is True:
            found.append(f"{where}: subprocess with shell=True")
        if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
            found.append(f"{where}: {fn.id}()")
        if name == "system" and owner == "os":
            found.append(f"{where}: os.system")
    return found


def test_audit_detects_each_unsafe_pattern():
    bad = """
import pickle
import numpy as np, torch, yaml, subprocess, os
from transformers import AutoModel
np.load("a.npy"); np.load("b.npz", allow_pickle=True); torch.load("c.pt"); yaml.load(s)
AutoModel.from_pretrained("x", trust_remote_code=True); subprocess.run("ls", shell=True)
eval("1"); os.system("ls"); app.run(host="0.0.0.0")
"""
    found = unsafe_calls(bad)
    for what in ("imports pickle", "np.load without", "torch.load", "yaml.load", "trust_remote_code",
                 "shell=True", "eval()", "os.system", "0.0.0.0"):
        assert any(what in f for f in found), (what, found)
    assert sum("np.load" in f for f in found) == 2
    good = """
import numpy as np, torch, yaml
np.load("a.npy", allow_pickle=False); torch.load("c.pt", weights_only=True); yaml.safe_load(s)
model.eval(); llm.eval(ids); AutoModel.from_pretrained("x", trust_remote_code=False)
\"\"\"docstrings may mention pickle, 0.0.0.0 is fine in prose\"\"\"
"""
    assert unsafe_calls(good) == [], unsafe_calls(good)


def test_library_and_benchmarks_have_no_unsafe_patterns():
    files = sorted((REPO / "moe2lib").rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    assert len(files) > 10
    found = [f for p in files for f in unsafe_calls(p.read_text(encoding="utf-8"), p.name)]
    assert found == []
