import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2lib.core.stats import stratified_sample
from moe2lib.data import loaders
from moe2lib.errors import InputError, ResourceUnavailable

from conftest import examples, needs_data


def test_mmlu_splits_have_their_published_sizes():
    test = loaders.load_mmlu("test")
    assert len(test) == 14042 and len(loaders.subjects_of(test)) == 57
    assert len(loaders.load_mmlu("val")) == 1531
    assert len(loaders.load_mmlu("dev")) == 285
    aux = loaders.load_mmlu("auxiliary_train")
    assert {"arc_easy", "obqa"} <= set(loaders.subjects_of(aux))


def test_known_first_question():
    q = loaders.load_mmlu("test", subjects=["anatomy"])[0]
    assert q.question.startswith("A lesion causing compression of the facial nerve at the stylomastoid foramen")
    assert q.answer == 0 and q.answer_letter == "A" and q.subject == "anatomy"
    assert q.source == "mmlu/test/anatomy_test.csv:1" and len(q.choices) == 4


def test_prompt_is_the_papers_zero_shot_format():
    q = loaders.Question("What is 2+2?", ("3", "4", "5", "6"), 1, "elementary_mathematics")
    assert loaders.format_prompt(q) == (
        "The following is a multiple choice question about elementary mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert loaders.format_prompt(q, "{question} [{subject}]") == "What is 2+2? [elementary mathematics]"
    with pytest.raises(InputError, match="template"):
        loaders.format_prompt(q, "{question} {topic}")
    with pytest.raises(InputError, match="template"):
        loaders.format_prompt(q, "{question")


def _mmlu_dir(tmp_path, rows: str):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    (folder / "toy_test.csv").write_text(rows)
    return tmp_path


@pytest.mark.parametrize("rows, line, message", [
    ('q1,a,b,c,d,A\nq2,a,b,c,A\n', 2, "expected 6 columns"),
    ('q1,a,b,c,d,A\n"multi\nline q",a,b,c,d,B\nq3,a,b,c,d,E\n', 4, "answer must be one of"),
    ('q1,a,b,c,d,A\n ,a,b,c,d,B\n', 2, "empty question"),
    ('q1,a,b,c,d,A\n"spans\ntwo lines",a,b,c,d,E\n', 2, "got 'E'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, rows, line, message):
    root = _mmlu_dir(tmp_path, rows)
    with pytest.raises(InputError, match=message) as err:
        loaders.load_mmlu("test", root)
    assert f"toy_test.csv:{line}" in str(err.value)


@pytest.mark.parametrize("raw, line, message", [
    (b"q1,a,b,c,d,A\nq2,a,b,c,A\nq3,\xff,b,c,d,A\n", 2, "expected 6 columns"),  # short row before bad bytes
    (b"q1,a,b,c,d,A\nq2,a,b,c,d,E\n\xff\n", 2, "got 'E'"),
    (b'q1,a,b,c,d,A\n"two\nlines",a,b,c,d,B\nq3,\xe9,b,c,d,A\n', 4, "not UTF-8"),  # the bytes' own line
    (b'\xef\xbb\xbfq1,a,b,c,d,A\r\n"cr\rcrlf\r\nq",a,b,c,d,B\rq3,a,b,c,d,\xff\n', 5, "not UTF-8"),
])
def test_csv_names_the_first_bad_line_whatever_its_fault(tmp_path, raw, line, message):
    """Read, decoded and parsed a line at a time: a bad row is named before bad bytes further down."""
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "toy_test.csv").write_bytes(raw)
    with pytest.raises(InputError, match=message) as err:
        loaders.load_mmlu("test", tmp_path)
    assert err.value.line == line and f"toy_test.csv:{line}: " in str(err.value)


def test_csv_read_a_line_at_a_time_keeps_multiline_fields_and_line_ends(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "toy_test.csv").write_bytes(
        '\ufeffq1,a,b,c,d,A\r\n"é\rcrlf\r\nq",a,b,c,d,B\rq3,a,"b\nb",c,d,C'.encode())
    qs = loaders.load_mmlu("test", tmp_path)
    assert [(q.question, q.choices[1], q.source.rsplit(":", 1)[1]) for q in qs] == [
        ("q1", "b", "1"), ("é\rcrlf\r\nq", "b", "2"), ("q3", "b\nb", "5")]


def test_empty_file_is_an_error(tmp_path):
    root = _mmlu_dir(tmp_path, "")
    with pytest.raises(InputError, match=r"toy_test\.csv: empty file"):
        loaders.load_mmlu("test", root)


def test_empty_split_folder_is_an_error(tmp_path):
    (tmp_path / "mmlu" / "val").mkdir(parents=True)
    with pytest.raises(InputError, match="no CSV files"):
        loaders.load_mmlu("val", tmp_path)


def test_unknown_split_and_subject():
    with pytest.raises(InputError, match="'split'"):
        loaders.load_mmlu("train")
    with pytest.raises(InputError, match="astrology.*known: abstract_algebra, anatomy"):
        loaders.load_mmlu("test", subjects=["astrology"])


def test_subject_filter():
    qs = loaders.load_mmlu("dev", subjects=["anatomy", "virology"])
    assert loaders.subjects_of(qs) == ["anatomy", "virology"] and len(qs) == 10
    assert [q.subject for q in loaders.load_mmlu("dev", subjects="anatomy")] == ["anatomy"] * 5


def test_jsonl_both_spellings_and_errors(tmp_path):
    good = tmp_path / "arc.jsonl"
    good.write_text(json.dumps({"query": "Q: sky?", "choices": ["red", "blue"], "gold": 1}) + "\n\n"
                    + json.dumps({"question": "sea?", "choices": ["w", "x", "y"], "answer": "C"}) + "\n")
    qs = loaders.load_jsonl(good)
    assert [q.answer for q in qs] == [1, 2] and qs[0].subject == "arc" and qs[1].source == "arc.jsonl:3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a", "choices": ["x", "y"], "gold": 0}) + "\n{oops\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: invalid JSON"):
        loaders.load_jsonl(bad)
    bad.write_text(json.dumps({"query": "a", "choices": ["x", "y"], "gold": 5}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:1: 'gold'"):
        loaders.load_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(InputError, match=r"bad\.jsonl: empty file"):
        loaders.load_jsonl(bad)
    bad.write_bytes(b'{}\n\xed\xa0\x80\n')  # line 1 lacks every field, line 2 is not UTF-8: line 1 is named
    with pytest.raises(InputError, match=r"bad\.jsonl:1: missing"):
        loaders.load_jsonl(bad)
    bad.write_bytes(b'{"query": "a", "choices": ["x", "y"], "gold": 0}\r\n\r\n\xff{}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:3: not UTF-8"):
        loaders.load_jsonl(bad)


@pytest.mark.parametrize("obj, message", [
    ({"query": " ", "choices": ["x", "y"], "gold": 0}, "empty 'query'"),
    ({"choices": ["x", "y"], "gold": 0}, "'query'/'question'"),
    ({"query": "a", "choices": ["x"], "gold": 0}, "'choices'"),
    ({"query": "a", "choices": ["x", 2], "gold": 0}, "'choices'"),
    ({"query": "a", "choices": ["x", "y"], "answer": "C"}, "got 'C'"),
    ({"query": "a", "choices": ["x", "y"]}, "'gold'"),
    ([1, 2], "JSON object"),
])
def test_jsonl_invalid_fields(tmp_path, obj, message):
    bad = tmp_path / "set.jsonl"
    bad.write_text(json.dumps({"query": "ok", "choices": ["x", "y"], "gold": 1}) + "\n\n" + json.dumps(obj) + "\n")
    with pytest.raises(InputError, match=message) as err:
        loaders.load_jsonl(bad)
    assert "set.jsonl:3" in str(err.value)


@needs_data
def test_real_jsonl_sets_load():
    root = loaders.resolve_data_dir(need="arc")
    arc = loaders.load_jsonl(root / "arc" / "llm-foundry_derived" / "arc_easy_test.jsonl")
    assert len(arc) == 2376 and all(len(q.choices) == 4 for q in arc)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path))
    with pytest.raises(ResourceUnavailable, match="data.tar"):
        loaders.resolve_data_dir()
    _mmlu_dir(tmp_path, "q,a,b,c,d,A\n")
    assert loaders.resolve_data_dir() == tmp_path
    assert len(loaders.load_mmlu("test")) == 1
    with pytest.raises(ResourceUnavailable, match="data_dir"):
        loaders.resolve_data_dir(tmp_path / "nowhere")


def test_data_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE2_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert (loaders.resolve_data_dir() / "mmlu" / "test" / "anatomy_test.csv").is_file()
    _mmlu_dir(tmp_path / "data", "q,a,b,c,d,A\n")
    assert loaders.resolve_data_dir() == (tmp_path / "data").resolve()
    monkeypatch.setattr(loaders, "_REPO", tmp_path / "repo")
    with pytest.raises(ResourceUnavailable) as err:
        loaders.resolve_data_dir(need="mmlu/val")
    message = str(err.value)
    assert str(tmp_path / "data") in message and "hendrycks/data.tar" in message and "MOE2_DATA_DIR" in message


def _toy(sizes):
    return [loaders.Question(f"q{s}{i}", ("a", "b"), 0, f"s{s}") for s, n in enumerate(sizes) for i in range(n)]


def _subjects(questions):
    return np.array([q.subject for q in questions])


def test_stratified_sample_is_exact_and_proportional():
    subj = _subjects(loaders.load_mmlu("test"))
    idx = stratified_sample(subj, 570, seed=0)
    assert len(idx) == 570 == len(set(idx.tolist()))
    assert len(set(subj[idx])) == 57
    assert abs((subj[idx] == "professional_law").sum() - 570 * 1534 / 14042) <= 1.5
    assert np.array_equal(idx, stratified_sample(subj, 570, seed=0))
    with pytest.raises(InputError, match="'n'"):
        stratified_sample(subj, 14043, seed=0)


def test_stratified_sample_allocation_on_toy_subjects():
    subj = _subjects(_toy([50, 30, 20]))
    idx = stratified_sample(subj, 10, seed=3)
    assert [(subj[idx] == s).sum() for s in ("s0", "s1", "s2")] == [5, 3, 2]
    subj = _subjects(_toy([97, 2, 1]))
    idx = stratified_sample(subj, 10, seed=3)
    assert [(subj[idx] == s).sum() for s in ("s0", "s1", "s2")] == [8, 1, 1]
    subj = _subjects(_toy([7, 5, 1]))
    idx = stratified_sample(subj, 2, seed=3)
    assert [(subj[idx] == s).sum() for s in ("s0", "s1", "s2")] == [1, 1, 0]
    even = _subjects(_toy([40, 40]))
    assert not np.array_equal(stratified_sample(even, 10, 0), stratified_sample(even, 10, 1))
    for bad in (0, 2.5):
        with pytest.raises(InputError, match="'n'"):
            stratified_sample(subj, bad, seed=0)
    with pytest.raises(InputError, match="remainder"):
        stratified_sample(subj, 2, seed=0, remainder="smallest")


def test_random_remainders_keep_shares_and_depend_on_seed():
    groups = np.array(["a"] * 60 + ["b"] * 40)
    test = stratified_sample(groups, 30, seed=1, remainder="random")
    assert len(test) == 30 == len(set(test.tolist())) and (groups[test] == "a").sum() == 18
    assert not np.array_equal(test, stratified_sample(groups, 30, seed=2, remainder="random"))
    np.testing.assert_array_equal(test, stratified_sample(groups, 30, seed=1, remainder="random"))


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.floats(0.05, 0.95), st.integers(0, 2**16),
       st.sampled_from(["largest", "random"]))
def test_sample_is_seeded_and_within_one_of_each_share(sizes, fraction, seed, remainder):
    subj = _subjects(_toy(sizes))
    n = int(np.clip(round(fraction * len(subj)), 1, len(subj)))
    sample = stratified_sample(subj, n, seed, remainder=remainder)
    assert len(sample) == len(set(sample.tolist())) == n
    assert np.array_equal(sample, stratified_sample(subj, n, seed, remainder=remainder))
    if remainder == "random":  # "largest" gives every subject one first, when n allows
        for s, size in enumerate(sizes):
            assert abs((subj[sample] == f"s{s}").sum() - n * size / len(subj)) <= 1


def test_mmlu_sample_is_the_shared_seeded_sample():
    a = loaders.mmlu_sample(114, seed=3)
    assert len(a) == 114 and len(loaders.subjects_of(a)) == 57
    assert [q.source for q in a] == [q.source for q in loaders.mmlu_sample(114, seed=3)]
    assert [q.source for q in a] != [q.source for q in loaders.mmlu_sample(114, seed=4)]
    assert len(loaders.mmlu_sample(0, seed=0, split="dev")) == 285
