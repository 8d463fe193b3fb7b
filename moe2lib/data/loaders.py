"""Multiple-choice questions: MMLU in its original CSV layout and JSONL sets, prompts, the seeded MMLU sample.

Every question becomes a :class:`Question`. Bad input (a row with the wrong number of columns, an
answer outside A–D, an empty question, an empty file, a bad JSON line, bytes that are not UTF-8)
raises an :class:`~moe2lib.errors.InputError` naming the file and the 1-based line; for a CSV row whose
quoted fields span several lines, that is the line where the row starts (for bytes that are not UTF-8,
the line of the first such byte). Files are read, decoded and parsed a line at a time, so the line named
is the first bad one, whether its fault is bytes, JSON, columns or fields.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.stats import stratified_sample
from ..errors import InputError, ResourceUnavailable

LETTERS = string.ascii_uppercase
MMLU_SPLITS = ("test", "val", "dev", "auxiliary_train")
DEFAULT_TEMPLATE = "The following is a multiple choice question about {subject}.\n\n{question}\n{choices}\nAnswer:"
HOW_TO_GET_MMLU = (
    "To get MMLU: download https://people.eecs.berkeley.edu/~hendrycks/data.tar, unpack it so that "
    "<dir>/mmlu/test/abstract_algebra_test.csv exists (rename the unpacked data/ folder to mmlu/), "
    "then pass data_dir=<dir> or set MOE2_DATA_DIR=<dir>.")
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` indexes ``choices``, ``source`` is ``"<file>:<line>"``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    source: str = ""

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def resolve_data_dir(data_dir=None, need: str = "mmlu") -> Path:
    """The folder holding ``need`` (a subpath such as ``mmlu`` or ``mmlu/test``).

    Candidates in order: ``data_dir``, ``$MOE2_DATA_DIR``, ``./data``, ``../shared/datasets`` from the
    working directory, then ``<repo>/data`` and ``<repo>/../shared/datasets`` (the pipeline runs the
    notebooks inside ``notebooks/``, where ``./data`` is not the repository's). An explicit folder
    (argument or variable) that lacks ``need`` fails at once; otherwise the first candidate holding it
    wins. Raises ResourceUnavailable, saying how to get MMLU, when none does.
    """
    for explicit, what in ((data_dir, "data_dir"), (os.environ.get("MOE2_DATA_DIR"), "MOE2_DATA_DIR")):
        if explicit:
            path = Path(explicit).expanduser()
            if not (path / need).exists():
                raise ResourceUnavailable(f"{what}={path} holds no {need}/. {HOW_TO_GET_MMLU}")
            return path
    tried = [Path("data"), Path("..") / "shared" / "datasets", _REPO / "data", _REPO.parent / "shared" / "datasets"]
    for path in tried:
        if (path / need).exists():
            return path.resolve()
    raise ResourceUnavailable(f"no {need}/ found in {', '.join(str(p.resolve()) for p in tried)}. {HOW_TO_GET_MMLU}")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


_READ: set[Path] = set()


def note_read(path) -> Path:
    """Record a data file as read by this process: a stage's meta.json lists the files it read with their
    sha256, and the pipeline reruns the stage when one of them changes."""
    path = Path(path).resolve()
    _READ.add(path)
    return path


def files_read() -> list[Path]:
    """The data files this process has read so far (:func:`note_read`), sorted."""
    return sorted(_READ)


_LINE_END = re.compile(rb"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")


def utf8_lines(fh, path, universal: bool = False):
    """Each line of the binary file ``fh`` as text (line end kept), read and decoded one line at a time.

    A loader that parses these as they come names the first bad line, whatever its fault: bytes that are
    not UTF-8 raise InputError naming ``path`` and their line only once every line before it was parsed.
    Lines end at "\\n" (JSON Lines); with ``universal`` also at "\\r" and "\\r\\n", as
    ``open(path, newline="")`` splits them for :mod:`csv`. A UTF-8 byte-order mark at the start is dropped.
    """
    n = 0
    for chunk in fh:
        if n == 0 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
            if not chunk:
                continue
        for raw in _LINE_END.findall(chunk) if universal and b"\r" in chunk else (chunk,):
            n += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"not UTF-8 ({exc.reason})", path=path, line=n) from None


def _mmlu_rows(path: Path):
    """(start line, row) for each CSV row, the file read, decoded and parsed a line at a time; csv errors
    become InputError at the row's first line, bytes that are not UTF-8 at their own line."""
    note_read(path)
    line = 1
    with open(path, "rb") as fh:
        reader = csv.reader(utf8_lines(fh, path, universal=True))
        try:
            for row in reader:
                start, line = line, reader.line_num + 1
                yield start, row
        except csv.Error as exc:
            raise InputError(f"malformed CSV ({exc})", path=path, line=line) from None


def _read_mmlu_csv(path: Path, subject: str, root: Path) -> list[Question]:
    """Questions of one headerless ``question,A,B,C,D,answer`` file; errors name the row's first line."""
    out = []
    for start, row in _mmlu_rows(path):
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
    """MMLU questions of a split (test, val, dev, auxiliary_train), files in sorted order, rows in file order.

    Reads ``<data dir>/mmlu/<split>/<subject>_<split>.csv`` (``auxiliary_train``: any ``*.csv``, subject
    = file stem); ``subjects`` keeps only those subjects.
    """
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
        wanted = {subjects} if isinstance(subjects, str) else set(subjects)
        unknown = sorted(wanted - set(by_subject))
        if unknown:
            raise InputError(f"unknown subjects {unknown}; known: {', '.join(sorted(by_subject))}", param="subjects")
        by_subject = {s: f for s, f in by_subject.items() if s in wanted}
    out = []
    for subject, path in by_subject.items():
        out.extend(_read_mmlu_csv(path, subject, root))
    return out


def read_jsonl(path):
    """(1-based line, object) of each non-blank line of a JSONL file, read, decoded and parsed one line at a
    time as the caller takes them, so the first bad line is the one named: bytes that are not UTF-8, a line
    that is not JSON or not a JSON object, and a file without one object raise an InputError naming the
    file and the line. Lines end at "\\n"."""
    path = Path(path)
    note_read(path)
    empty = True
    with open(path, "rb") as fh:
        for n, raw in enumerate(utf8_lines(fh, path), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON ({exc.msg})", path=path, line=n) from None
            except (ValueError, RecursionError) as exc:  # a 4300+-digit integer, nesting deeper than the stack
                raise InputError(f"invalid JSON ({str(exc)[:80]})", path=path, line=n) from None
            if not isinstance(obj, dict):
                raise InputError("each line must be a JSON object", path=path, line=n)
            empty = False
            yield n, obj
    if empty:
        raise InputError("empty file: no questions", path=path)


def iter_jsonl(path, subject: str | None = None):
    """Questions from JSONL lines of ``{"query"|"question": str, "choices": [str], "gold"|"answer": int|letter}``.

    Blank lines are skipped; the subject defaults to the file stem. The question text is kept as written
    (e.g. ARC's "Question: " prefix stays), so prompts match the source data. Questions come as the file is
    read, so a caller that checks each one further also meets the first bad line first.
    """
    path = Path(path)
    subject = subject or path.stem
    for n, obj in read_jsonl(path):
        question = obj.get("query", obj.get("question"))
        if not isinstance(question, str) or not question.strip():
            raise InputError("missing or empty 'query'/'question'", path=path, line=n)
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise InputError("'choices' must be a list of at least 2 strings", path=path, line=n)
        given = gold = obj.get("gold", obj.get("answer"))
        if isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().upper() in LETTERS:
            gold = LETTERS.index(gold.strip().upper())
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise InputError(f"'gold'/'answer' must index (or letter) one of the {len(choices)} choices, "
                             f"got {given!r}", path=path, line=n)
        yield Question(question, tuple(choices), gold, subject, f"{path.name}:{n}")


def load_jsonl(path, subject: str | None = None) -> list[Question]:
    """The questions of a JSONL file (:func:`iter_jsonl`) as a list."""
    return list(iter_jsonl(path, subject))


def format_prompt(q: Question, template: str = DEFAULT_TEMPLATE) -> str:
    """The paper's zero-shot prompt (or ``template``, with fields subject, question, choices)."""
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    try:
        return template.format(subject=q.subject.replace("_", " "), question=q.question, choices=choices)
    except (KeyError, IndexError, AttributeError) as exc:
        raise InputError(f"template uses an unknown field {exc}; fields: subject, question, choices",
                         param="template") from None
    except ValueError as exc:
        raise InputError(f"malformed template ({exc})", param="template") from None


def subjects_of(questions: Sequence[Question]) -> list[str]:
    """The sorted distinct subjects."""
    return sorted({q.subject for q in questions})


def mmlu_sample(n_questions: int, seed: int, split: str = "test", data_dir=None) -> list[Question]:
    """The profile's MMLU questions: a seeded sample stratified by subject (``n_questions=0``: all of them).

    Every stage that reads MMLU calls this with the profile's ``n_questions`` and ``seed``, so their
    question lists (and ``qid``s) agree.
    """
    questions = load_mmlu(split, data_dir)
    if not n_questions:
        return questions
    return [questions[i] for i in stratified_sample([q.subject for q in questions], n_questions, seed)]
