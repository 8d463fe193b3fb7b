import json
from collections import defaultdict

import numpy as np
import pytest
from conftest import needs_data

from moe2lib.data import tasks
from moe2lib.data.loaders import resolve_data_dir
from moe2lib.data.tasks import ChoiceItem
from moe2lib.errors import InputError, ResourceUnavailable

ROWS = {  # rows per file, from SOURCES.md
    "mmlu": 14042, "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "agieval_lsat_ar": 230,
    "agieval_lsat_lr": 510, "agieval_lsat_rc": 268, "agieval_sat_en": 206, "agieval_logiqa_en": 651,
    "bigbench_novel_concepts": 32, "bigbench_strategy_qa": 2289, "commonsense_qa": 1221, "copa": 100, "piqa": 1838,
    "siqa": 1954, "bigbench_conceptual_combinations": 103, "winogrande": 1267, "bigbench_understanding_fables": 189,
    "boolq": 3270, "pubmed_qa_labeled": 1000, "bigbench_logical_deduction": 1500, "math_qa": 2983,
    "bigbench_misconceptions": 219,
}
DROPPED = {  # (exact repeats, defective: an empty option or the gold option repeated), as measured
    "mmlu": (105, 4), "agieval_logiqa_en": (0, 6), "commonsense_qa": (0, 4), "siqa": (12, 1), "math_qa": (0, 62),
}


def test_registry_covers_every_task():
    assert list(tasks.TASKS) == list(ROWS)
    assert tasks.EDGE_MIX_DEFAULT[0] == "mmlu" and set(tasks.EDGE_MIX_DEFAULT) == set(ROWS)
    assert all(0 < s.chance < 1 and s.description for s in tasks.TASKS.values())


@needs_data
@pytest.mark.parametrize("name", list(ROWS))
def test_each_task_loads_every_row(name):
    raw = tasks.read_task(name)
    assert len(raw) == ROWS[name]
    kept, dropped = tasks.clean(raw)
    assert (dropped["duplicates"], dropped["defective"]) == DROPPED.get(name, (0, 0))
    assert tasks.load_task(name) == kept
    assert len({item.qid for item in kept}) == len(kept)
    n = round(1 / tasks.TASKS[name].chance)
    for item in kept:
        assert item.task == name and item.qid.startswith(f"{name}:") and item.text.strip()
        assert item.n_choices == len(item.contexts) == n >= 2 and 0 <= item.gold < n
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)
        assert not item.text.endswith(("Answer:", "A:"))
        assert not any(f"A.{sep} {item.continuations[0].strip()}\n" in item.contexts[0] for sep in ("", ")"))


@needs_data
def test_known_items():
    csqa = tasks.load_task("commonsense_qa")[0]
    assert csqa.continuations == (" bank", " department store", " mall", " new york") and csqa.gold == 0
    assert csqa.contexts[0] == ("Question: A revolving door is convenient for two direction travel, but it also "
                                "serves as a security measure at a what?\nAnswer:")
    assert csqa.text.startswith("A revolving door")
    assert csqa.source == "llm-foundry/commonsense_reasoning/commonsense_qa.jsonl:1"
    assert csqa.qid == "commonsense_qa:038e6e1f0e42"  # stable across runs and machines

    wino = tasks.load_task("winogrande")[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    assert wino.text == "Sarah was a much better surgeon than Maria so _ always got the easier cases."

    logiqa = tasks.load_task("agieval_logiqa_en")[0]  # options start on the "Choices: A. ..." line
    assert logiqa.continuations[0] == " Civic Park is north of the administrative service area." and logiqa.gold == 0
    assert logiqa.contexts[0].endswith("which of the following can be derived?\nAnswer:")
    lsat = tasks.load_task("agieval_lsat_lr")[0]  # "A.) ..." options
    assert lsat.continuations[3].startswith(" A school calendar made up") and lsat.gold == 3
    mmlu = tasks.load_task("mmlu")[0]
    assert mmlu.contexts[0].startswith("The following are questions about abstract algebra.\nQuestion: Find the degree")


@needs_data
def test_pubmed_gold_is_the_continuation():
    path = resolve_data_dir(None, "llm-foundry") / tasks.TASKS["pubmed_qa_labeled"].path
    answers = [json.loads(line)["continuation"] for line in path.read_text().splitlines() if line.strip()]
    items = tasks.load_task("pubmed_qa_labeled")
    assert [item.continuations[item.gold] for item in items] == [" " + a for a in answers]
    assert {item.continuations for item in items} == {(" yes", " no", " maybe")}
    assert "\nA. yes" not in items[0].contexts[0] and items[0].contexts[0].endswith("?\nAnswer:")


# --- synthetic files -------------------------------------------------------------------------------------

CSQA = json.dumps({"query": "Question: Where?\nChoices:\nA. here\nB. there\nAnswer:", "choices": ["A", "B"], "gold": 1})
WINO = json.dumps({"context_options": ["Tom beat Sam so Tom", "Tom beat Sam so Sam"], "continuation": "won.", "gold": 0})
PUBMED = json.dumps({"context": "Context: x\nQuestion: y?\nA. yes\nB. no\nC. maybe\nAnswer: ", "continuation": "no"})


def _write(root, name, text):
    path = root / tasks.TASKS[name].path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_synthetic_files_parse(tmp_path):
    _write(tmp_path, "commonsense_qa", CSQA + "\n\n" + CSQA.replace("Where?", "  where? ") + "\n")
    raw = tasks.read_task("commonsense_qa", tmp_path)
    assert raw[0].contexts == ("Question: Where?\nAnswer:",) * 2 and raw[0].continuations == (" here", " there")
    assert raw[1].source.endswith("commonsense_qa.jsonl:3") and raw[1].qid == raw[0].qid  # same after normalising
    assert tasks.load_task("commonsense_qa", tmp_path) == raw[:1]
    _write(tmp_path, "winogrande", WINO)
    assert tasks.load_task("winogrande", tmp_path)[0].text == "Tom beat Sam so _ won."
    _write(tmp_path, "pubmed_qa_labeled", PUBMED)
    pub = tasks.load_task("pubmed_qa_labeled", tmp_path)[0]
    assert pub.gold == 1 and pub.contexts[0] == "Context: x\nQuestion: y?\nAnswer:"
    assert pub.text == "Context: x\nQuestion: y?"
    _write(tmp_path, "piqa", json.dumps({"query": "Question: Open a jar\n", "choices": ["twist", "hit"], "gold": 0}))
    assert tasks.load_task("piqa", tmp_path)[0].contexts[0] == "Question: Open a jar\nAnswer:"
    _write(tmp_path, "copa", json.dumps({"query": "It rained, therefore", "choices": ["wet.", "dry."], "gold": 0}))
    assert tasks.load_task("copa", tmp_path)[0].pairs()[0] == ("It rained, therefore", " wet.")


@pytest.mark.parametrize("name, text, line, message", [
    ("commonsense_qa", CSQA + "\n{not json\n", 2, "invalid JSON"),
    ("commonsense_qa", CSQA.replace('"gold": 1', '"gold": 2'), 1, "must index"),
    ("commonsense_qa", CSQA + "\n" + json.dumps({"choices": ["A", "B"], "gold": 0}), 2, "query"),
    ("commonsense_qa", CSQA.replace("B. there", "B there"), 1, "option lines"),
    ("commonsense_qa", CSQA.replace('["A", "B"]', '["A", "B", "C"]'), 1, "option lines"),
    ("bigbench_conceptual_combinations", json.dumps({"query": "Q?\nA. x\nB. y\nAnswer:", "choices": ["x", "z"],
                                                     "gold": 0}), 1, "differ from 'choices'"),
    ("winogrande", WINO + "\n" + WINO.replace('"continuation": "won.", ', ""), 2, "'continuation'"),
    ("winogrande", WINO.replace('"gold": 0', '"gold": 2'), 1, "must index"),
    ("pubmed_qa_labeled", PUBMED.replace('"no"}', '"perhaps"}'), 1, "not one of the option lines"),
    ("pubmed_qa_labeled", "[1, 2]", 1, "JSON object"),
    ("pubmed_qa_labeled", b'{"context": "\xff"}', 1, "not UTF-8"),
    # read a line at a time: a bad line 1 is named even when bad bytes follow
    ("commonsense_qa", CSQA.replace("B. there", "B there").encode() + b"\n\xff\n", 1, "option lines"),
    ("pubmed_qa_labeled", PUBMED.replace('"no"}', '"perhaps"}').encode() + b"\n\xff\n", 1, "option lines"),
    ("winogrande", WINO.encode() + b"\n\n{\xed\xa0\x80}\n" + WINO.encode(), 3, "not UTF-8"),
    ("piqa", "\n\n", None, "empty file"),
])
def test_malformed_input_names_file_and_line(tmp_path, name, text, line, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(InputError, match=message) as err:
        tasks.load_task(name, tmp_path)
    assert err.value.path == str(path) and err.value.line == line


def test_missing_file_or_task(tmp_path):
    (tmp_path / "llm-foundry").mkdir()
    with pytest.raises(ResourceUnavailable, match=r"boolq.jsonl not found.*llm-foundry.*SOURCES.md"):
        tasks.load_task("boolq", tmp_path)
    with pytest.raises(InputError, match="unknown task"):
        tasks.load_task("nope")


# --- splits ----------------------------------------------------------------------------------------------

def _items(n, repeat_every=0):
    """n items; with repeat_every=k every k-th item repeats the previous one's text (in other case/spacing)."""
    out = []
    for i in range(n):
        text = f"Question {i // 2 if repeat_every and i % repeat_every else i}"
        text = text.upper().replace(" ", "   ") if repeat_every and i % repeat_every else text
        out.append(ChoiceItem(f"t:{i}", "t", text, ("c", "c"), (" a", " b"), 0))
    return out


def test_split_groups_equal_texts_and_is_seeded():
    items = _items(600, repeat_every=3)
    labels = tasks.split_task(items, (0.5, 0.25, 0.25), seed=3)
    by_text = defaultdict(set)
    for item, label in zip(items, labels):
        by_text[" ".join(item.text.lower().split())].add(label)
    assert len(by_text) < len(items) and all(len(s) == 1 for s in by_text.values())
    assert np.array_equal(labels, tasks.split_task(items, (0.5, 0.25, 0.25), seed=3))
    assert not np.array_equal(labels, tasks.split_task(items, (0.5, 0.25, 0.25), seed=4))
    share = [np.mean(labels == s) for s in tasks.SPLITS]
    assert np.allclose(share, (0.5, 0.25, 0.25), atol=0.02)
    assert list(tasks.split_task(_items(10), (0.6, 0.2, 0.2), 0)).count("expert") == 6
    for bad in [(0.5, 0.5), (0.6, 0.6, -0.2), (0.5, 0.2, 0.2)]:
        with pytest.raises(InputError, match="fractions"):
            tasks.split_task(items, bad, 0)


@pytest.fixture(scope="module")
def edge_mix():
    return tasks.build_benchmark(seed=0)


@needs_data
def test_benchmark_splits_share_no_question_text(edge_mix):
    by_text = defaultdict(set)
    for item, label in zip(edge_mix.items, edge_mix.split):
        by_text[" ".join(item.text.lower().split())].add(str(label))
    assert all(len(s) == 1 for s in by_text.values())
    assert len(by_text) < len(edge_mix.items)  # grouped repeats exist (e.g. logical deduction puzzles)
    dropped = edge_mix.params["dropped"]
    assert dropped["arc_easy"]["cross_task"] == 1 and dropped["arc_challenge"]["cross_task"] == 1
    counts = edge_mix.counts()
    for name in edge_mix.tasks:
        n = sum(counts[name].values())
        assert n == ROWS[name] - sum(dropped[name].values())
        if n >= 1000:
            assert abs(counts[name]["expert"] / n - 0.6) < 0.03 and abs(counts[name]["test"] / n - 0.2) < 0.03
    assert len(edge_mix.where("gating")) == sum(c["gating"] for c in counts.values())


@needs_data
def test_benchmark_is_seeded_and_capped(edge_mix):
    names = ["arc_easy", "copa", "winogrande"]
    mix = tasks.build_benchmark(names, cap_expert=100, cap_eval={"arc_easy": 50, "copa": 1000}, seed=0)
    counts = mix.counts()
    assert counts["arc_easy"]["expert"] == 100 and counts["arc_easy"]["gating"] + counts["arc_easy"]["test"] == 50
    assert counts["copa"] == {"expert": 60, "gating": 20, "test": 20}  # under the caps: all of it
    assert counts["winogrande"]["expert"] == 100 and sum(counts["winogrande"].values()) > 500
    again = tasks.build_benchmark(names, cap_expert=100, cap_eval={"arc_easy": 50, "copa": 1000}, seed=0)
    assert again.items == mix.items and np.array_equal(again.split, mix.split)
    other = tasks.build_benchmark(names, cap_expert=100, cap_eval={"arc_easy": 50, "copa": 1000}, seed=1)
    assert [i.qid for i in other.items] != [i.qid for i in mix.items]
    # a task's items do not depend on the other tasks (no cross-task repeats here)
    alone = tasks.build_benchmark(["copa"], seed=0)
    assert alone.items == [i for i in edge_mix.items if i.task == "copa"]
    for bad in [{"cap_eval": {"mmlu": 5}}, {"cap_expert": -1}, {"cap_expert": 2.5}]:
        with pytest.raises(InputError, match="cap"):
            tasks.build_benchmark(["copa"], **bad)
    with pytest.raises(InputError, match="unknown"):
        tasks.build_benchmark(["copa", "nope"])


@needs_data
def test_benchmark_save_and_load(tmp_path):
    mix = tasks.build_benchmark(["copa", "winogrande"], cap_eval=40, seed=2)
    path = mix.save(tmp_path / "edge_mix.jsonl")
    manifest = json.loads((tmp_path / "edge_mix.manifest.json").read_text())
    assert manifest["counts"] == mix.counts() and manifest["n_items"] == len(mix.items) == len(mix.to_records())
    back = tasks.EdgeMix.load(path)
    assert back.items == mix.items and np.array_equal(back.split, mix.split) and back.params == mix.params
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="manifest"):
        tasks.EdgeMix.load(path)
    path.write_text("\n".join(lines[:2] + ['{"qid": 1}']) + "\n")
    with pytest.raises(InputError, match="edge-mix record") as err:
        tasks.EdgeMix.load(path)
    assert err.value.line == 3
    with pytest.raises(ResourceUnavailable):
        tasks.EdgeMix.load(tmp_path / "missing.jsonl")


def test_validation_split_is_seeded_disjoint_and_per_task():
    items = [ChoiceItem(f"{t}:{i}", t, f"{t} question {i % 40}", ("c", "c"), (" a", " b"), 0)
             for t in ("a", "b") for i in range(100 if t == "a" else 30)]  # texts repeat within a task
    train, val = tasks.validation_split(items, 0.2, seed=1)
    assert sorted(map(id, train + val)) == sorted(map(id, items))  # a partition
    assert not {it.text for it in train} & {it.text for it in val}  # equal texts stay on one side
    per_task = {t: sum(it.task == t for it in val) for t in ("a", "b")}
    assert per_task["a"] in range(20, 23) and per_task["b"] == 6  # 20% of each task (groups of 2-3 for "a")
    again = tasks.validation_split(items, 0.2, seed=1)
    assert again == (train, val)
    assert tasks.validation_split(items, 0.2, seed=2)[1] != val
    # a task's draw does not depend on the other tasks
    assert tasks.validation_split([it for it in items if it.task == "b"], 0.2, seed=1)[1] == [
        it for it in val if it.task == "b"]
    assert tasks.validation_split(items, 0.0, seed=1) == (items, [])
    with pytest.raises(InputError, match="validation_fraction"):
        tasks.validation_split(items, 1.0)


@needs_data
def test_validation_is_disjoint_from_training_gating_and_test(edge_mix):
    train, val = tasks.validation_split(edge_mix.where("expert"), 0.1, seed=0)
    texts = {s: {" ".join(it.text.lower().split()) for it in group} for s, group in
             (("train", train), ("val", val), ("gating", edge_mix.where("gating")), ("test", edge_mix.where("test")))}
    assert len(val) > 100
    for other in ("train", "gating", "test"):
        assert not texts["val"] & texts[other], other
