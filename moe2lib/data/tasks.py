"""Multiple-choice tasks scored by the likelihood of each choice's text, and the ``edge-mix`` benchmark.

Every question of every task becomes a :class:`ChoiceItem`: per choice a context (the prompt) and a
continuation (" " + the choice text), scored as log p(continuation | context), as lm-evaluation-harness
does for "cloze" tasks. Contexts:

- MMLU: "The following are questions about {subject}.\nQuestion: {question}\nAnswer:".
- query files ({"query", "choices", "gold"}): the query as written, without its option lines ("A. ...",
  parsed into the choice texts where ``choices`` are letters) and ending in its own answer cue ("Answer:"
  or "A:"), or "\nAnswer:" added where it has none ("Question: ...\nAnswer:" for ARC, PIQA; "Passage:
  ...\nQuestion: ...\nAnswer:" for BoolQ). COPA and OpenBookQA are sentences the choice completes: the
  query alone.
- PubMedQA: "Context: ...\nQuestion: ...\nAnswer:" (options line dropped), choices yes / no / maybe.
- WinoGrande: a context per choice (the sentence up to the option) and one shared continuation.

``text`` (what the gating network and the clustering embed) is the context without its answer cue and
without a leading "Question:"/"Q:" label (MMLU: the question alone; WinoGrande: the sentence with "_").
``qid`` is a stable hash of the normalised text and choices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError, ResourceUnavailable, check_int
from ..infra.artifacts import read_json, write_json, write_text
from .loaders import LETTERS, iter_jsonl, load_mmlu, read_jsonl, resolve_data_dir


@dataclass(frozen=True)
class ChoiceItem:
    """One question: ``contexts[c]`` followed by ``continuations[c]`` is choice c; ``gold`` indexes the choices.

    ``contexts`` and ``continuations`` have one entry per choice (a shared one is repeated). ``text`` is
    what the gating network and the clustering embed (the question as a user would send it); ``source``
    is ``"<file>:<line>"``.
    """

    qid: str
    task: str
    text: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    source: str = ""

    @property
    def n_choices(self) -> int:
        return len(self.continuations)

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        return list(zip(self.contexts, self.continuations))


# --- the tasks -----------------------------------------------------------------------------------------

SPLITS = ("expert", "gating", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
MMLU_CONTEXT = "The following are questions about {subject}.\nQuestion: {question}\nAnswer:"
_FOUNDRY = "mosaicml/llm-foundry@8c8dd48f scripts/eval/local_data/"
_CUE = re.compile(r"\n(Answer|A):\s*$")
_OPTION = re.compile(r"(?:Choices:\s*)?([A-Z])(?:\.\)|\.)\s*(.*)")
_LABEL = re.compile(r"^(?:Question|Q):\s*")


@dataclass(frozen=True)
class TaskSpec:
    """A task: its file under the data folder, its format and how its prompts are built.

    ``fmt`` is ``mmlu``, ``query`` ({"query", "choices", "gold"}), ``winogrande`` ({"context_options",
    "continuation", "gold"}) or ``pubmed`` ({"context", "continuation"}). ``lettered``: the choices are the
    letters A.. and the option texts are lines "A. ..." of the query. ``completion``: the query is a
    sentence the choice completes, so no answer cue is added. ``upstream``: where the file comes from.
    """

    name: str
    path: str
    fmt: str
    chance: float
    description: str
    upstream: str
    lettered: bool = False
    completion: bool = False


def _foundry(name, path, chance, description, *, upstream=None, fmt="query", **kw) -> TaskSpec:
    upstream = _FOUNDRY + (upstream or path.removeprefix("llm-foundry/"))
    return TaskSpec(name, path, fmt, chance, description, upstream, **kw)


_AGI = "agieval/llm-foundry_derived/agi_eval_"
_CR, _LU, _RC, _SP, _WK = (f"llm-foundry/{c}/" for c in ("commonsense_reasoning", "language_understanding",
                                                          "reading_comprehension", "symbolic_problem_solving",
                                                          "world_knowledge"))
TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("mmlu", "mmlu/test", "mmlu", 1 / 4, "MMLU test split, 57 subjects, 4 options",
             "hendrycks/test data.tar (see moe2lib.data.loaders.HOW_TO_GET_MMLU)"),
    _foundry("arc_easy", "arc/llm-foundry_derived/arc_easy_test.jsonl", 1 / 4, "ARC-Easy grade-school science",
             upstream="world_knowledge/arc_easy.jsonl"),
    _foundry("arc_challenge", "arc/llm-foundry_derived/arc_challenge_test.jsonl", 1 / 4,
             "ARC-Challenge grade-school science", upstream="world_knowledge/arc_challenge.jsonl"),
    _foundry("openbookqa", "openbookqa/llm-foundry_derived/openbookqa_test.jsonl", 1 / 4,
             "OpenBookQA elementary science, sentence completion", upstream="commonsense_reasoning/openbook_qa.jsonl",
             completion=True),
    _foundry("agieval_lsat_ar", _AGI + "lsat_ar.jsonl", 1 / 4, "AGIEval LSAT analytical reasoning (4 of 5 options)",
             upstream="symbolic_problem_solving/agi_eval_lsat_ar.jsonl", lettered=True),
    _foundry("agieval_lsat_lr", _AGI + "lsat_lr.jsonl", 1 / 4, "AGIEval LSAT logical reasoning (4 of 5 options)",
             upstream="reading_comprehension/agi_eval_lsat_lr.jsonl", lettered=True),
    _foundry("agieval_lsat_rc", _AGI + "lsat_rc.jsonl", 1 / 4, "AGIEval LSAT reading comprehension (4 of 5 options)",
             upstream="reading_comprehension/agi_eval_lsat_rc.jsonl", lettered=True),
    _foundry("agieval_sat_en", _AGI + "sat_en.jsonl", 1 / 4, "AGIEval SAT English reading",
             upstream="reading_comprehension/agi_eval_sat_en.jsonl", lettered=True),
    _foundry("agieval_logiqa_en", _AGI + "logiqa_en.jsonl", 1 / 4, "AGIEval LogiQA logical reasoning",
             upstream="symbolic_problem_solving/logi_qa.jsonl", lettered=True),
    _foundry("bigbench_novel_concepts", _CR + "bigbench_novel_concepts.jsonl", 1 / 4,
             "BIG-bench: the concept common to listed things"),
    _foundry("bigbench_strategy_qa", _CR + "bigbench_strategy_qa.jsonl", 1 / 2,
             "BIG-bench StrategyQA: yes/no questions needing implicit multi-step reasoning"),
    _foundry("commonsense_qa", _CR + "commonsense_qa.jsonl", 1 / 4, "CommonsenseQA everyday knowledge",
             lettered=True),
    _foundry("copa", _CR + "copa.jsonl", 1 / 2, "COPA: the plausible cause or effect of a premise",
             completion=True),
    _foundry("piqa", _CR + "piqa.jsonl", 1 / 2, "PIQA: the physically sensible way to reach a goal"),
    _foundry("siqa", _CR + "siqa.jsonl", 1 / 2, "Social IQa: social situations (2 of 3 options)", lettered=True),
    _foundry("bigbench_conceptual_combinations", _LU + "bigbench_conceptual_combinations.jsonl", 1 / 4,
             "BIG-bench: the meaning of unusual word combinations"),
    _foundry("winogrande", _LU + "winogrande.jsonl", 1 / 2, "WinoGrande pronoun/blank resolution",
             fmt="winogrande"),
    _foundry("bigbench_understanding_fables", _RC + "bigbench_understanding_fables.jsonl", 1 / 4,
             "BIG-bench: the moral of a fable", lettered=True),
    _foundry("boolq", _RC + "boolq.jsonl", 1 / 2, "BoolQ yes/no questions about a passage"),
    _foundry("pubmed_qa_labeled", _RC + "pubmed_qa_labeled.jsonl", 1 / 3,
             "PubMedQA yes/no/maybe questions about an abstract", fmt="pubmed"),
    _foundry("bigbench_logical_deduction", _SP + "bigbench_logical_deduction.jsonl", 1 / 4,
             "BIG-bench: order of objects deduced from constraints"),
    _foundry("math_qa", _SP + "math_qa.jsonl", 1 / 4, "MathQA math word problems", lettered=True),
    _foundry("bigbench_misconceptions", _WK + "bigbench_misconceptions.jsonl", 1 / 2,
             "BIG-bench: true or false statements about common misconceptions"),
)}
"""Every task, by name: MMLU (test split) and every multiple-choice file of the shared data folder."""

EDGE_MIX_DEFAULT: tuple[str, ...] = tuple(TASKS)
"""The ``edge-mix`` tasks: MMLU plus every task of the registry."""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _qid(task: str, text: str, choices) -> str:
    """Stable id: ``<task>:`` + sha1 of the normalised text and choice texts, joined by a unit separator."""
    key = "\x1f".join(_norm(s) for s in (text, *choices))
    return f"{task}:{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def _item(task, text, contexts, choices, gold, source, continuations=None) -> ChoiceItem:
    """A ChoiceItem whose continuations are `` <choice>`` unless given; ``choices`` enter the qid."""
    continuations = continuations or tuple(" " + c.strip() for c in choices)
    return ChoiceItem(_qid(task, text, choices), task, text, tuple(contexts), tuple(continuations), gold, source)


def _parse_query(query: str):
    """(body, answer cue or None, option texts or None) of a query such as "Question: ...\\nA. x\\nB. y\\nAnswer:".

    The options are the lines "A. ..." / "A.) ..." (the first may follow "Choices:") ending the query before
    its cue, lettered A, B, ... in order; a lone "Choices:" line before them is dropped with them.
    """
    query = query.rstrip()
    cue = _CUE.search(query)
    if cue:
        query = query[:cue.start()].rstrip()
    lines = query.split("\n")
    options, i = [], len(lines)
    while i > 0 and (m := _OPTION.fullmatch(lines[i - 1].strip())):
        if options and ord(m[1]) != ord(options[0][0]) - 1:
            break
        options.insert(0, (m[1], m[2].strip()))
        i -= 1
        if m[1] == "A":
            break
    if not options or options[0][0] != "A":
        return query, cue and cue[1] + ":", None
    if i > 0 and lines[i - 1].strip() == "Choices:":
        i -= 1
    return "\n".join(lines[:i]).rstrip(), cue and cue[1] + ":", [text for _, text in options]


def _cloze(spec: TaskSpec, query: str, choices, gold: int, source: str, path, line) -> ChoiceItem:
    """A query-format row as a cloze item: the query without its option list, then its answer cue."""
    body, cue, options = _parse_query(query)
    if spec.lettered:
        if options is None or list(choices) != list(LETTERS[:len(options)]):
            raise InputError(f"expected option lines 'A. ...' in the query, one per choice {list(choices)}",
                             path=path, line=line)
        choices = options
    elif options is not None and [c.strip() for c in choices] != options:
        raise InputError("the option lines in the query differ from 'choices'", path=path, line=line)
    context = body if spec.completion else f"{body}\n{cue or 'Answer:'}"
    text = _LABEL.sub("", body, count=1)
    return _item(spec.name, text, [context] * len(choices), choices, gold, source)


def _field(obj, key, kind, path, line):
    """``obj[key]`` if it is a ``kind`` (a str: not blank; a list: of at least 2 strings), else InputError."""
    value = obj.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is str:
        ok = bool(value.strip())
    if ok and kind is list:
        ok = len(value) >= 2 and all(isinstance(v, str) for v in value)
    if not ok:
        what = "a list of at least 2 strings" if kind is list else kind.__name__
        raise InputError(f"missing or malformed {key!r} (must be {what})", path=path, line=line)
    return value


def _read_query(spec, path, rel):
    out = []
    for q in iter_jsonl(path):
        line = int(q.source.rsplit(":", 1)[1])
        out.append(_cloze(spec, q.question, q.choices, q.answer, f"{rel}:{line}", path, line))
    return out


def _read_winogrande(spec, path, rel):
    """Contexts: the sentence up to each option; continuation: the rest, shared; text: the sentence with "_"."""
    out = []
    for n, obj in read_jsonl(path):
        options = [o.rstrip() for o in _field(obj, "context_options", list, path, n)]
        rest = _field(obj, "continuation", str, path, n).strip()
        gold = _field(obj, "gold", int, path, n)
        if not 0 <= gold < len(options):
            raise InputError(f"'gold' must index one of the {len(options)} context_options, got {gold}",
                             path=path, line=n)
        prefix = os.path.commonprefix(options)
        prefix = prefix[:prefix.rfind(" ") + 1]
        text = f"{prefix}_{' ' if rest[:1].isalnum() else ''}{rest}"
        out.append(_item(spec.name, text, options, [o[len(prefix):] for o in options], gold, f"{rel}:{n}",
                         [" " + rest] * len(options)))
    return out


def _read_pubmed(spec, path, rel):
    """The options (yes/no/maybe) are lines of the context; the gold is the option the continuation names."""
    out = []
    for n, obj in read_jsonl(path):
        body, cue, options = _parse_query(_field(obj, "context", str, path, n))
        answer = _field(obj, "continuation", str, path, n).strip()
        if options is None or answer not in options:
            raise InputError(f"continuation {answer!r} is not one of the option lines 'A. ...' of the context",
                             path=path, line=n)
        out.append(_item(spec.name, body, [f"{body}\n{cue or 'Answer:'}"] * len(options), options,
                         options.index(answer), f"{rel}:{n}"))
    return out


def _read_mmlu(spec, data_dir):
    out = []
    for q in load_mmlu("test", data_dir):
        context = MMLU_CONTEXT.format(subject=q.subject.replace("_", " "), question=q.question.strip())
        out.append(_item(spec.name, q.question.strip(), [context] * len(q.choices), q.choices, q.answer, q.source))
    return out


_READERS = {"query": _read_query, "winogrande": _read_winogrande, "pubmed": _read_pubmed}


def read_task(name: str, data_dir=None) -> list[ChoiceItem]:
    """Every row of a task's file as a ChoiceItem, in file order, duplicates included."""
    spec = TASKS.get(name)
    if spec is None:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}", param="name")
    if spec.fmt == "mmlu":
        return _read_mmlu(spec, data_dir)
    try:
        root = resolve_data_dir(data_dir, spec.path)
    except ResourceUnavailable:
        raise ResourceUnavailable(
            f"{spec.path} not found in the data folder (data_dir, $MOE2_DATA_DIR, ./data or ../shared/datasets); "
            f"it is {spec.upstream}, see SOURCES.md in the shared datasets folder") from None
    return _READERS[spec.fmt](spec, root / spec.path, spec.path)


def defective(item: ChoiceItem) -> bool:
    """True when cloze scoring cannot tell the gold apart: an empty choice text, or the gold choice repeated."""
    pairs = item.pairs()
    return any(not c.strip() for c in item.continuations) or pairs.count(pairs[item.gold]) > 1


def clean(items: Sequence[ChoiceItem]) -> tuple[list[ChoiceItem], dict[str, int]]:
    """The items without exact repeats (same qid: task, text and choices; the first kept) and without
    :func:`defective` ones; and how many of each went (``{"duplicates": n, "defective": m}``)."""
    seen, out, dropped = set(), [], {"duplicates": 0, "defective": 0}
    for item in items:
        if item.qid in seen:
            dropped["duplicates"] += 1
        elif defective(item):
            dropped["defective"] += 1
        else:
            out.append(item)
        seen.add(item.qid)
    return out, dropped


def load_task(name: str, data_dir=None) -> list[ChoiceItem]:
    """A task's questions in file order, without exact repeats and defective items (:func:`clean`)."""
    return clean(read_task(name, data_dir))[0]


# --- splits and the edge-mix benchmark -------------------------------------------------------------------

def _check_fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise InputError(f"must be 3 non-negative numbers (expert, gating, test) summing to 1, got {fractions!r}",
                         param="fractions")
    return f


def split_task(items: Sequence[ChoiceItem], fractions=DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Seeded split labels ("expert", "gating", "test"), one per item, in the given proportions.

    Items with the same normalised text (lower-cased, whitespace collapsed) form a group that lands
    wholly in one split, so no question is trained on and tested. The groups are shuffled and dealt in
    order: a group goes to the split whose share of the items its first item falls in.
    """
    f = _check_fractions(fractions)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(_norm(item.text), []).append(i)
    members = list(groups.values())
    bounds = np.round(np.cumsum(f)[:2] * len(items))
    labels = np.empty(len(items), dtype="<U6")
    start = 0
    for g in np.random.default_rng(seed).permutation(len(members)):
        labels[members[g]] = SPLITS[int(np.searchsorted(bounds, start, side="right"))]
        start += len(members[g])
    return labels


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{task}".encode()).digest()[:8], "big")


def _cap(cap, tasks, param) -> dict[str, int | None]:
    """Per-task cap from an int (every task), a mapping (missing tasks: no cap) or None (no cap)."""
    caps = dict(cap) if isinstance(cap, Mapping) else {t: cap for t in tasks}
    unknown = sorted(set(caps) - set(tasks))
    if unknown:
        raise InputError(f"caps must be of tasks in the benchmark; unknown tasks {unknown}", param=param)
    return {t: check_int(caps.get(t), param, low=0, none=True) for t in tasks}


@dataclass
class EdgeMix:
    """The edge-mix benchmark: items of several tasks, each labelled "expert", "gating" or "test".

    ``params`` records how it was built (seed, fractions, caps) and what was dropped per task.
    """

    items: list[ChoiceItem]
    split: np.ndarray
    tasks: tuple[str, ...]
    params: dict = field(default_factory=dict)
    name: str = "edge-mix"
    data_dir: str | None = None

    def summary(self) -> str:
        """One line per task: questions per split, and the totals."""
        counts = self.counts()
        width = max(len(t) for t in self.tasks)
        lines = [f"{self.name}: {len(self.items)} questions in {len(self.tasks)} tasks "
                 f"({', '.join(f'{s} {int((self.split == s).sum())}' for s in SPLITS)})"]
        lines += [f"  {t:{width}s} " + "  ".join(f"{s} {counts[t][s]:5d}" for s in SPLITS) for t in self.tasks]
        return "\n".join(lines)

    def source_files(self) -> list[Path]:
        """The data files the items were read from (for a stage's recorded input hashes)."""
        files = set()
        for task in self.tasks:
            root = resolve_data_dir(self.data_dir, TASKS[task].path)
            files.update(root / it.source.rsplit(":", 1)[0] for it in self.items if it.task == task)
        return sorted(files)

    def where(self, split: str) -> list[ChoiceItem]:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; known: {', '.join(SPLITS)}", param="split")
        return [item for item, s in zip(self.items, self.split) if s == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Items per task and split."""
        out = {t: dict.fromkeys(SPLITS, 0) for t in self.tasks}
        for item, s in zip(self.items, self.split):
            out[item.task][s] += 1
        return out

    def manifest(self) -> dict:
        return {"benchmark": self.name, "n_items": len(self.items), "tasks": list(self.tasks),
                "params": self.params, "counts": self.counts()}

    def to_records(self) -> list[dict]:
        return [{**asdict(item), "split": str(s)} for item, s in zip(self.items, self.split)]

    def save(self, path) -> Path:
        """Write the items as JSONL at ``path`` and the manifest beside it (``<stem>.manifest.json``), atomically."""
        path = Path(path)
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.to_records()))
        write_json(_manifest_path(path), self.manifest())
        return path

    @classmethod
    def load(cls, path) -> "EdgeMix":
        """Read what :meth:`save` wrote; a record that does not parse, or counts unlike the manifest's, raise."""
        path = Path(path)
        if not path.exists() or not _manifest_path(path).exists():
            raise ResourceUnavailable(f"{path} or its manifest is missing; "
                                      "write it with build_benchmark(...).save(path)")
        manifest = read_json(_manifest_path(path))
        if not isinstance(manifest, dict) or not {"tasks", "params", "counts"} <= manifest.keys():
            raise InputError("not an edge-mix manifest (needs tasks, params, counts)", path=_manifest_path(path))
        items, split = [], []
        for n, r in read_jsonl(path):
            try:
                if r["split"] not in SPLITS or r["task"] not in manifest["tasks"]:
                    raise ValueError(f"split {r['split']!r} or task {r['task']!r} unknown")
                items.append(ChoiceItem(r["qid"], r["task"], r["text"], tuple(r["contexts"]),
                                        tuple(r["continuations"]), r["gold"], r["source"]))
                split.append(r["split"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"not an edge-mix record ({exc!r})", path=path, line=n) from None
        mix = cls(items, np.array(split, dtype="<U6"), tuple(manifest["tasks"]), manifest["params"], manifest.get("benchmark", "edge-mix"))
        if mix.counts() != manifest["counts"]:
            raise InputError("items per task and split differ from the manifest's counts", path=path)
        return mix


def _manifest_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.manifest.json")


def build_benchmark(tasks: Sequence[str] = EDGE_MIX_DEFAULT, *, cap_expert=None, cap_eval=None,
                    fractions=DEFAULT_FRACTIONS, seed: int = 0, data_dir=None, name: str = "edge-mix") -> EdgeMix:
    """The edge-mix benchmark: per task, load, drop cross-task repeats, shuffle, split and cap.

    A question text (normalised) that an earlier task in ``tasks`` already has is dropped, so no text is in
    two splits across the benchmark. Each task is then shuffled and split (:func:`split_task`) with its own
    seed, derived from ``seed`` and the task name (stable across runs and machines). ``cap_expert`` caps the
    expert-training items of a task, ``cap_eval`` its gating + test items together (taken in shuffled
    order, so roughly in proportion): an int for every task, a mapping task -> int (missing: no cap) or
    None (no cap). Items are grouped by task in ``tasks`` order, shuffled within a task.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise InputError(f"need distinct known tasks; unknown {unknown}; known: {', '.join(TASKS)}", param="tasks")
    f = _check_fractions(fractions)
    caps = {side: _cap(cap, tasks, param) for side, cap, param in
            (("expert", cap_expert, "cap_expert"), ("eval", cap_eval, "cap_eval"))}
    seen: set[str] = set()
    items, split, dropped = [], [], {}
    for task in tasks:
        loaded, dropped[task] = clean(read_task(task, data_dir))
        fresh = [item for item in loaded if _norm(item.text) not in seen]
        seen.update(_norm(item.text) for item in loaded)
        dropped[task]["cross_task"] = len(loaded) - len(fresh)
        task_seed = _task_seed(seed, task)
        fresh = [fresh[i] for i in np.random.default_rng(task_seed).permutation(len(fresh))]
        taken = {"expert": 0, "eval": 0}
        for item, label in zip(fresh, split_task(fresh, f, task_seed)):
            side = "expert" if label == "expert" else "eval"
            if caps[side][task] is None or taken[side] < caps[side][task]:
                taken[side] += 1
                items.append(item)
                split.append(label)
    params = {"seed": seed, "fractions": f.tolist(), "cap_expert": caps["expert"], "cap_eval": caps["eval"],
              "dropped": dropped}
    return EdgeMix(items, np.array(split, dtype="<U6"), tasks, params, name, None if data_dir is None else str(data_dir))


def validation_split(items: Sequence[ChoiceItem], fraction: float, seed: int = 0) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    """Expert-training items cut into (train, validation): per task, a seeded ``fraction`` of its items.

    Validation is what the expert settings are chosen on, so that the test split is seen once. Items of one
    task with the same normalised text go to the same side. Each task's draw has its own seed (from ``seed``
    and the task), so adding a task leaves the others' validation questions as they were.
    """
    if not 0 <= fraction < 1:
        raise InputError(f"must be in [0, 1), got {fraction!r}", param="validation_fraction")
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    held = np.zeros(len(items), dtype=bool)
    for task, rows in by_task.items():
        groups: dict[str, list[int]] = {}
        for i in rows:
            groups.setdefault(_norm(items[i].text), []).append(i)
        members, want, taken = list(groups.values()), round(fraction * len(rows)), 0
        for g in np.random.default_rng(_task_seed(seed, f"validation:{task}")).permutation(len(members)):
            if taken >= want:
                break
            held[members[g]] = True
            taken += len(members[g])
    return [it for it, h in zip(items, held) if not h], [it for it, h in zip(items, held) if h]
