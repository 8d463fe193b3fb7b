"""Multiple-choice questions: MMLU in its original CSV layout and JSONL sets, prompts, seeded splits.

Every question becomes a :class:`Question`. Bad input (a row with the wrong number of columns, an
answer outside A–D, an empty question, an empty file, a bad JSON line) raises an
:class:`~moe2lib.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, ResourceUnavailable

LETTERS = string.ascii_uppercase
MMLU_SPLITS = ("test", "val", "dev", "auxiliary_train")
DEFAULT_TEMPLATE = "The following is a multiple choice question about {subject}.\n\n{question}\n{choices}\nAnswer:"
HOW_TO_GET_MMLU = (
    "To get MMLU: download https://people.eecs.berkeley.edu/~hendrycks/data.tar, unpack it so that "
    "<dir>/mmlu/test/abstract_algebra_test.csv exists (rename the unpacked data/ folder to mmlu/), "
    "then pass data_dir=<dir> or set MOE2_DATA_DIR=<dir>.")
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    source: str = ""  # "<file relative to the data dir>:<line>"

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def resolve_data_dir(data_dir=None, need: str = "mmlu") -> Path:
    """The data folder: ``data_dir``, else ``$MOE2_DATA_DIR``, else ``./data``, else ``../shared/datasets``.

    An explicit folder (argument or variable) that lacks ``need`` is an error at once; otherwise the
    first candidate holding ``need`` wins.
    """
    for explicit, what in ((data_dir, "data_dir"), (os.environ.get("MOE2_DATA_DIR"), "MOE2_DATA_DIR")):
        if explicit:
            path = Path(explicit).expanduser()
            if not (path / need).exists():
                raise ResourceUnavailable(f"{what}={path} holds no {need}/. {HOW_TO_GET_MMLU}")
            return path
    tried = [Path("data"), Path("..") / "shared" / "datasets", _REPO.parent / "shared" / "datasets"]
    for path in tried:
        if (path / need).exists():
            return path.resolve()
    raise ResourceUnavailable(f"no {need}/ found in {', '.join(str(p.resolve()) for p in tried)}. {HOW_TO_GET_MMLU}")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _read_mmlu_csv(path: Path, subject: str, root: Path) -> list[Question]:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        line = 1
        for row in reader:
            start, line = line, reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise InputError(f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}",
                                 path=path, line=start)
            question, *choices, answer = row
            if not question.strip():
                raise InputError("empty question", path=path, line=start)
            answer = answer.strip()
            if answer not in ("A", "B", "C", "D"):
                raise InputError(f"answer must be one of A, B, C, D, got {answer!r}", path=path, line=start)
            out.append(Question(question, tuple(choices), "ABCD".index(answer), subject,
                                f"{_rel(path, root)}:{start}"))
    if not out:
        raise InputError("empty file: no questions", path=path)
    return out


def load_mmlu(split: str, data_dir=None, subjects: Sequence[str] | None = None) -> list[Question]:
    """MMLU questions of a split (test, val, dev, auxiliary_train), files in sorted order, rows in file order."""
    if split not in MMLU_SPLITS:
        raise InputError(f"unknown MMLU split {split!r}; known: {', '.join(MMLU_SPLITS)}", param="split")
    root = resolve_data_dir(data_dir, f"mmlu/{split}")
    folder = root / "mmlu" / split
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise InputError(f"no CSV files in the MMLU {split} split", path=folder)
    suffix = "" if split == "auxiliary_train" else f"_{split}"
    by_subject = {(f.stem[: -len(suffix)] if suffix and f.stem.endswith(suffix) else f.stem): f for f in files}
    if subjects is not None:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise InputError(f"unknown subjects {unknown}; known: {', '.join(sorted(by_subject))}", param="subjects")
        by_subject = {s: f for s, f in by_subject.items() if s in set(subjects)}
    out = []
    for subject, path in by_subject.items():
        out.extend(_read_mmlu_csv(path, subject, root))
    return out


def load_jsonl(path, subject: str | None = None) -> list[Question]:
    """Questions from JSONL lines of ``{"query"|"question": str, "choices": [str], "gold"|"answer": int|letter}``.

    The question text is kept as written (e.g. ARC's "Question: " prefix stays).
    """
    path = Path(path)
    subject = subject or path.stem
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON ({exc.msg})", path=path, line=n) from None
            if not isinstance(obj, dict):
                raise InputError("each line must be a JSON object", path=path, line=n)
            question = obj.get("query", obj.get("question"))
            if not isinstance(question, str) or not question.strip():
                raise InputError("missing or empty 'query'/'question'", path=path, line=n)
            choices = obj.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise InputError("'choices' must be a list of at least 2 strings", path=path, line=n)
            gold = obj.get("gold", obj.get("answer"))
            if isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().upper() in LETTERS:
                gold = LETTERS.index(gold.strip().upper())
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise InputError(f"'gold'/'answer' must index one of the {len(choices)} choices, got {gold!r}",
                                 path=path, line=n)
            out.append(Question(question, tuple(choices), gold, subject, f"{path.name}:{n}"))
    if not out:
        raise InputError("empty file: no questions", path=path)
    return out


def format_prompt(q: Question, template: str = DEFAULT_TEMPLATE) -> str:
    """The paper's zero-shot prompt (or ``template``, with fields subject, question, choices)."""
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    try:
        return template.format(subject=q.subject.replace("_", " "), question=q.question, choices=choices)
    except (KeyError, IndexError) as exc:
        raise InputError(f"template uses an unknown field {exc}; fields: subject, question, choices",
                         param="template") from None


def subjects_of(questions: Sequence[Question]) -> list[str]:
    return sorted({q.subject for q in questions})


def _by_subject(questions) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.subject, []).append(i)
    return dict(sorted(groups.items()))


def stratified_split(questions: Sequence[Question], test_fraction: float, seed: int):
    """Seeded (train, test) index arrays, each subject split in the same proportion.

    A subject with two or more questions keeps at least one on each side.
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"must be in (0, 1), got {test_fraction}", param="test_fraction")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for idx in _by_subject(questions).values():
        idx = rng.permutation(idx)
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def stratified_sample(questions: Sequence[Question], n: int, seed: int) -> np.ndarray:
    """Seeded sample of exactly ``n`` indices, allotted to subjects by largest remainder (sorted)."""
    if not 0 < n <= len(questions):
        raise InputError(f"must be in 1..{len(questions)}, got {n}", param="n")
    groups = _by_subject(questions)
    sizes = np.array([len(v) for v in groups.values()], dtype=np.float64)
    quota = sizes * n / sizes.sum()
    take = np.floor(quota).astype(int)
    if n >= len(groups):
        take = np.maximum(take, 1)
    rest = n - take.sum()
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    if rest > 0:
        for j in order:
            if rest == 0:
                break
            if take[j] < sizes[j]:
                take[j] += 1
                rest -= 1
    elif rest < 0:
        for j in np.argsort(-take, kind="stable"):
            while rest < 0 and take[j] > 1:
                take[j] -= 1
                rest += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(idx, size=t, replace=False) for idx, t in zip(groups.values(), take)]
    return np.sort(np.concatenate(picked).astype(np.int64))
