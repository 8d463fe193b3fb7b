"""Score a multiple-choice data set with a list of experts into the scores artifact.

The artifact (one ``.npz``, no pickle) holds ``probs[N, K, C]`` (each expert's distribution over
the choice letters), ``answer[N]``, ``subject[N]``, ``qid[N]``, ``n_tokens[N, K]`` (prompt length in
each expert's tokens) and ``experts[K]``. Work is checkpointed every few questions into a
``<name>.partial/`` folder, so an interrupted run resumes where it stopped; the final file is
written atomically and the partial folder removed only then.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifacts, parallel
from .data import DEFAULT_TEMPLATE, Question, format_prompt
from .errors import InputError


def correct_matrix(probs, answer) -> np.ndarray:
    """1.0 where expert k's argmax letter is right → (N, K)."""
    return (np.asarray(probs).argmax(-1) == np.asarray(answer)[:, None]).astype(np.float64)


def align_rows(qid, other_qid, *, path=None, param: str = "qid", hint: str = "") -> np.ndarray:
    """Row of ``other_qid`` holding each of ``qid`` (a join on qid); InputError naming the first one missing."""
    index = {q: i for i, q in enumerate(np.asarray(other_qid).astype(str).tolist())}
    qid = np.asarray(qid).astype(str).tolist()
    missing = [q for q in qid if q not in index]
    if missing:
        raise InputError(f"{len(missing)} missing (first: {missing[0]!r}){hint}", path=path, param=param)
    return np.array([index[q] for q in qid], dtype=np.int64)


@dataclass
class Scores:
    probs: np.ndarray
    answer: np.ndarray
    subject: np.ndarray
    qid: np.ndarray
    n_tokens: np.ndarray
    experts: np.ndarray
    n_choices: np.ndarray | None = None  # choices per question where they differ (probs padded with 0s)

    @property
    def n(self) -> int:
        return self.probs.shape[0]

    def accuracy(self) -> np.ndarray:
        """Accuracy of each expert (argmax letter), shape (K,)."""
        return correct_matrix(self.probs, self.answer).mean(0)

    def subset(self, rows) -> "Scores":
        rows = np.asarray(rows)
        return Scores(self.probs[rows], self.answer[rows], self.subject[rows], self.qid[rows],
                      self.n_tokens[rows], self.experts, None if self.n_choices is None else self.n_choices[rows])

    @property
    def mask(self) -> np.ndarray:
        """(N, C) bool: which padded choice slots are real choices."""
        c = self.probs.shape[-1]
        counts = np.full(self.n, c) if self.n_choices is None else self.n_choices
        return np.arange(c)[None, :] < np.asarray(counts)[:, None]

    def save(self, path) -> Path:
        validate(self, path)
        _check_unique(self, path)
        extra = {} if self.n_choices is None else {"n_choices": self.n_choices}
        return artifacts.write_npz(path, probs=self.probs, answer=self.answer, subject=self.subject,
                                   qid=self.qid, n_tokens=self.n_tokens, experts=self.experts, **extra)

    @classmethod
    def load(cls, path) -> "Scores":
        data = artifacts.read_npz(path)
        missing = [k for k in ("probs", "answer", "subject", "qid", "n_tokens", "experts") if k not in data]
        if missing:
            raise InputError(f"scores file lacks {missing}", path=path)
        scores = cls(**{k: data[k] for k in ("probs", "answer", "subject", "qid", "n_tokens", "experts")},
                     n_choices=data.get("n_choices"))
        validate(scores, path)
        _check_unique(scores, path)
        return scores


def validate(s: Scores, path=None, atol: float = 1e-3) -> None:
    """Check shapes and dtypes, that n_tokens are not negative and every probs[n, k, :] is a distribution.

    Each error names the file (``path``), the array and the first bad row/expert.
    """
    if s.probs.ndim != 3:
        raise InputError(f"probs must be (N, K, C), got shape {s.probs.shape}", path=path, param="probs")
    n, k, c = s.probs.shape
    for name, arr, shape in (("answer", s.answer, (n,)), ("subject", s.subject, (n,)), ("qid", s.qid, (n,)),
                             ("n_tokens", s.n_tokens, (n, k)), ("experts", s.experts, (k,))):
        if arr.shape != shape:
            raise InputError(f"{name} has shape {arr.shape}, expected {shape} to match probs {s.probs.shape}",
                             path=path, param=name)
    for name, arr, kind in (("probs", s.probs, np.number), ("answer", s.answer, np.integer),
                            ("n_tokens", s.n_tokens, np.number)):
        if not np.issubdtype(arr.dtype, kind) or np.issubdtype(arr.dtype, np.bool_):
            raise InputError(f"{name} must hold {'integers' if kind is np.integer else 'numbers'}, "
                             f"got dtype {arr.dtype}", path=path, param=name)
    if (s.n_tokens < 0).any():
        i = np.argwhere(s.n_tokens < 0)[0]
        raise InputError(f"n_tokens[{i[0]}, {i[1]}] is negative", path=path, param="n_tokens")
    bad = ~np.isfinite(s.probs)
    if bad.any():
        i = np.argwhere(bad)[0]
        raise InputError(f"probs[{i[0]}, {i[1]}] is not finite", path=path, param="probs")
    if (s.probs < 0).any():
        i = np.argwhere(s.probs < 0)[0]
        raise InputError(f"probs[{i[0]}, {i[1]}] has a negative entry", path=path, param="probs")
    sums = s.probs.sum(-1)
    off = np.abs(sums - 1) > atol
    if off.any():
        i = np.argwhere(off)[0]
        raise InputError(f"probs[{i[0]}, {i[1]}] sums to {sums[i[0], i[1]]:.6f}, not 1", path=path, param="probs")
    if ((s.answer < 0) | (s.answer >= c)).any():
        raise InputError(f"answer has values outside 0..{c - 1}", path=path, param="answer")
    if s.n_choices is not None:
        nc = np.asarray(s.n_choices)
        if nc.shape != (n,) or not np.issubdtype(nc.dtype, np.integer) or ((nc < 2) | (nc > c)).any():
            raise InputError(f"n_choices must be (N={n},) integers in 2..{c}", path=path, param="n_choices")
        if (s.answer >= nc).any():
            raise InputError(f"answer of row {int(np.argmax(s.answer >= nc))} is beyond its n_choices",
                             path=path, param="answer")
        beyond = (s.probs > 0) & ~s.mask[:, None, :]
        if beyond.any():
            i = np.argwhere(beyond)[0]
            raise InputError(f"probs[{i[0]}, {i[1]}] puts mass on choice {i[2]} of {nc[i[0]]}", path=path,
                             param="probs")


def _check_unique(s: Scores, path=None) -> None:
    """A scores file is joined on qid and indexed by expert name: a repeated one would match silently wrong."""
    for name, arr in (("qid", s.qid), ("experts", s.experts)):
        values, counts = np.unique(np.asarray(arr).astype(str), return_counts=True)
        if (counts > 1).any():
            raise InputError(f"{str(values[counts > 1][0])!r} appears {counts[counts > 1][0]} times; "
                             f"{name} must be distinct", path=path, param=name)


def score_questions(questions: Sequence[Question], experts, out_path, *, template: str = DEFAULT_TEMPLATE,
                    chunk: int = 32, progress: bool = True, workers: int = 1, scheduler: str | None = None) -> Scores:
    """Score every question by its answer letter with every expert; resumable, written atomically to ``out_path``.

    ``workers > 1`` scores that many experts at once, each in a process of its own, ``scheduler`` on
    Dask workers (see :func:`_per_process`).
    """
    if not questions:
        raise InputError("no questions to score", param="questions")
    if (parallel.check_workers(workers) > 1 or scheduler is not None) and len(experts) > 1:
        return _per_process(score_questions, questions, experts, out_path, workers, [q.source for q in questions],
                            scheduler, template=template, chunk=chunk)
    n_choices = {len(q.choices) for q in questions}
    if len(n_choices) != 1:
        raise InputError(f"questions have different numbers of choices {sorted(n_choices)}", param="questions")
    c = n_choices.pop()
    prompts = [format_prompt(q, template) for q in questions]

    def score(expert, rows):
        batch = [prompts[i] for i in rows]
        return expert.choice_probs(batch, c), [expert.count_tokens(p) for p in batch]

    return _score_resumable(experts, out_path, score, qid=[q.source for q in questions], work=prompts,
                            answer=[q.answer for q in questions], subject=[q.subject for q in questions],
                            width=c, chunk=chunk, progress=progress)


def score_items(items, experts, out_path, *, normalisation: str = "char", width: int | None = None,
                chunk: int = 32, progress: bool = True, workers: int = 1, scheduler: str | None = None) -> Scores:
    """Score :class:`~moe2lib.tasks.ChoiceItem`s by the likelihood of each choice's text; resumable, atomic.

    Each expert's distribution over a question's choices is the softmax of its normalised continuation
    log-likelihoods (:func:`moe2lib.choice.normalise`); rows are padded with zeros to ``width`` choices
    (default: the most any item has) and ``n_choices`` records the real count. ``n_tokens`` is the length
    of the (first choice's) prompt in each expert's tokens. ``workers > 1`` scores that many experts at
    once, each in a process of its own, ``scheduler`` on Dask workers (see :func:`_per_process`).
    """
    from . import choice

    if not items:
        raise InputError("no questions to score", param="items")
    width = width or max(it.n_choices for it in items)
    if (parallel.check_workers(workers) > 1 or scheduler is not None) and len(experts) > 1:
        return _per_process(score_items, items, experts, out_path, workers, [it.qid for it in items],
                            scheduler, normalisation=normalisation, width=width, chunk=chunk)
    requests = [it.pairs() for it in items]

    def score(expert, rows):
        probs = np.zeros((len(rows), width), dtype=np.float32)
        for r, z in enumerate(choice.score(expert, [requests[i] for i in rows], normalisation)):
            probs[r, :len(z)] = choice.choice_distribution(z)
        return probs, [expert.count_tokens(items[i].contexts[0]) for i in rows]

    return _score_resumable(experts, out_path, score, qid=[it.qid for it in items],
                            work=[[requests[i], normalisation] for i in range(len(items))],
                            answer=[it.gold for it in items], subject=[it.task for it in items], width=width,
                            n_choices=[it.n_choices for it in items], chunk=chunk, progress=progress)


def _keyed_folder(folder: Path, key: str, **about) -> None:
    """A checkpoint folder for the work ``key`` names: one left by other work (or without its manifest)
    is removed, so a rerun never reuses stale parts."""
    manifest = folder / "manifest.json"
    if folder.exists() and (not manifest.exists() or artifacts.read_json(manifest).get("key") != key):
        shutil.rmtree(folder)
    artifacts.write_json(manifest, {"key": key, **about})


def _per_process(fn, work, experts, out_path, workers: int, qid, scheduler=None, **kwargs) -> Scores:
    """``fn(work, [expert], ...)`` for each expert in ``workers`` processes (or on the Dask workers of
    ``scheduler``, see :func:`moe2lib.parallel.run`), then one Scores at ``out_path``.

    Each expert's scores are saved here to ``<out>.experts/<j>.npz`` as soon as it is done, so a rerun
    scores only the missing experts (a local worker also checkpoints inside its expert); the folder is keyed
    by the questions, the options and the experts' identities, and removed once the whole result is
    written. The experts are sent unloaded: each worker loads its own model.
    """
    out_path = Path(out_path)
    folder = out_path.with_name(out_path.name + ".experts")
    key = artifacts.digest({"qid": list(qid), "options": kwargs, "experts": [e.label for e in experts],
                            "identity": [e.identity() for e in experts]})
    _keyed_folder(folder, key)
    paths = [folder / f"{j}.npz" for j in range(len(experts))]
    todo = [j for j in range(len(experts)) if not paths[j].exists()]
    parallel.run(fn, [(work, [experts[j]], paths[j]) for j in todo], workers, scheduler=scheduler,
                 on_result=lambda i, scores: scores.save(paths[todo[i]]),
                 desc=f"scoring {out_path.name} ({workers} experts at once)", progress=False, **kwargs)
    scores = concat_experts(*[Scores.load(p) for p in paths])
    scores.save(out_path)
    shutil.rmtree(folder, ignore_errors=True)
    return scores


def _score_resumable(experts, out_path, score, *, qid, work, answer, subject, width: int, n_choices=None,
                     chunk: int, progress: bool) -> Scores:
    """Run ``score(expert, rows) -> (probs[len(rows), width], n_tokens)`` over all rows and experts.

    Checkpointed per expert every ``chunk`` rows into ``<out>.partial/`` keyed by the questions, the work
    (prompts), the expert names and identities (a retrained adapter is new work); the result is written
    atomically and the checkpoint removed only then.
    """
    out_path = Path(out_path)
    labels = [e.label for e in experts]
    if len(set(labels)) != len(labels):
        raise InputError(f"expert names must be unique, got {labels}", param="experts")
    n, k = len(qid), len(experts)
    partial = out_path.with_name(out_path.name + ".partial")
    key = artifacts.digest({"qid": list(qid), "prompts": work, "experts": labels,
                            "identity": [e.identity() for e in experts]})
    _keyed_folder(partial, key, experts=labels, n=n)

    probs = np.zeros((n, k, width), dtype=np.float32)
    n_tokens = np.zeros((n, k), dtype=np.int32)
    done = np.zeros(k, dtype=np.int64)
    for j, label in enumerate(labels):
        part = partial / f"expert{j}.npz"
        if part.exists():
            d = artifacts.read_npz(part)
            m = len(d["probs"])
            probs[:m, j], n_tokens[:m, j], done[j] = d["probs"], d["n_tokens"], m
    if progress and done.any():  # say what is reused, so a resumed run's log shows it
        print(f"{out_path.name}: resuming from the checkpoint in {partial.name}/, {int(done.sum())} of {n * k} "
              f"scores already done ({', '.join(f'{lab}: {int(d)}' for lab, d in zip(labels, done))})")

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * k, initial=int(done.sum()), desc=f"scoring {out_path.name}", unit="q")
    for j, expert in enumerate(experts):
        if done[j] >= n:
            continue
        try:
            for start in range(int(done[j]), n, chunk):
                stop = min(n, start + chunk)
                probs[start:stop, j], n_tokens[start:stop, j] = score(expert, range(start, stop))
                artifacts.write_npz(partial / f"expert{j}.npz", probs=probs[:stop, j], n_tokens=n_tokens[:stop, j])
                if bar is not None:
                    bar.update(stop - start)
        finally:
            expert.close()
    if bar is not None:
        bar.close()
    scores = Scores(probs=probs, answer=np.asarray(answer, dtype=np.int64), subject=np.array(subject),
                    qid=np.array(qid), n_tokens=n_tokens, experts=np.array(labels),
                    n_choices=None if n_choices is None else np.asarray(n_choices, dtype=np.int64))
    scores.save(out_path)
    shutil.rmtree(partial, ignore_errors=True)
    return scores


def subject_accuracy(scores: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-subject accuracy of each expert: (subjects[S], accuracy[K, S], questions per subject[S])."""
    subjects, inverse, counts = np.unique(scores.subject, return_inverse=True, return_counts=True)
    correct = correct_matrix(scores.probs, scores.answer)
    sums = np.zeros((len(subjects), correct.shape[1]))
    np.add.at(sums, inverse, correct)
    return subjects, (sums / counts[:, None]).T, counts


def letter_bias(scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """How often each expert picks each letter (K, C), beside how often each letter is correct (C,)."""
    c = scores.probs.shape[-1]
    picks = scores.probs.argmax(-1)
    chosen = np.stack([(picks == i).mean(0) for i in range(c)], axis=-1)
    gold = np.bincount(scores.answer, minlength=c) / scores.n
    return chosen, gold


# --- specialisation: accuracy per prompt cluster, against the base models -----------------------------

def align(scores: Scores, qid, path=None) -> Scores:
    """``scores`` with its rows reordered to ``qid``; the two must hold the same questions (else InputError)."""
    qid = np.asarray(qid).astype(str)
    rows = align_rows(qid, scores.qid, path=path, hint="; score both on the same MMLU sample")
    extra = sorted(set(scores.qid.astype(str).tolist()) - set(qid.tolist()))
    if extra or len(set(qid.tolist())) != len(qid):
        raise InputError(f"question ids do not match: {len(extra)} extra (e.g. {extra[:3]}) or repeated; "
                         "score both on the same MMLU sample", path=path, param="qid")
    return scores.subset(rows)


def concat_experts(*parts: Scores) -> Scores:
    """One Scores with the experts of all parts side by side; every part must have the same rows (qid order)."""
    first = parts[0]
    for p in parts[1:]:
        if not np.array_equal(p.qid, first.qid) or not np.array_equal(p.answer, first.answer):
            raise InputError("scores to concatenate must list the same questions in the same order", param="qid")
    return Scores(np.concatenate([p.probs for p in parts], 1), first.answer, first.subject, first.qid,
                  np.concatenate([p.n_tokens for p in parts], 1), np.concatenate([p.experts for p in parts]),
                  first.n_choices)


def lookup_clusters(qid, cluster_qid, cluster, path=None) -> np.ndarray:
    """The cluster of each ``qid`` from a (cluster_qid, cluster) table such as clusters.npz's mmlu_* arrays."""
    rows = align_rows(qid, cluster_qid, path=path, param="mmlu_qid",
                      hint=" have no cluster; rerun the clustering stage with these questions")
    return np.asarray(cluster, dtype=np.int64)[rows]


def cluster_accuracy(scores: Scores, clusters, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy[K, k], questions per cluster[k]); NaN where a cluster has no question."""
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape != (scores.n,):
        raise InputError(f"clusters has shape {clusters.shape}, expected ({scores.n},)", param="clusters")
    if scores.n and (clusters.min() < 0 or clusters.max() >= k):
        raise InputError(f"cluster ids must be in 0..{k - 1}", param="clusters")
    correct = correct_matrix(scores.probs, scores.answer)
    counts = np.bincount(clusters, minlength=k)
    sums = np.zeros((k, correct.shape[1]))
    np.add.at(sums, clusters, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts[:, None] > 0, sums / counts[:, None], np.nan)
    return acc.T, counts


def own_cluster_accuracy(scores: Scores, clusters, expert_cluster) -> tuple[np.ndarray, np.ndarray]:
    """Each expert's accuracy on the questions of its own cluster and on all others, (own[K], other[K]).

    ``expert_cluster[j]`` is expert j's cluster (None or -1: none, giving NaN); an empty side gives NaN.
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    correct = correct_matrix(scores.probs, scores.answer)
    own = np.full(len(scores.experts), np.nan)
    other = np.full(len(scores.experts), np.nan)
    for j, c in enumerate(expert_cluster):
        if c is None or c < 0:
            continue
        mine = clusters == c
        if mine.any():
            own[j] = correct[mine, j].mean()
        if (~mine).any():
            other[j] = correct[~mine, j].mean()
    return own, other


def base_columns(base: Scores, base_models) -> np.ndarray:
    """Column of ``base`` holding each named base model (labels as ``models.display_name`` gives them)."""
    from .models import display_name

    names = base.experts.tolist()
    out = []
    for m in base_models:
        label = display_name(m)
        if label not in names:
            raise InputError(f"base model {label!r} is not in the base scores (they hold {names})",
                             param="base_model")
        out.append(names.index(label))
    return np.array(out, dtype=np.int64)


def own_cluster_gain(scores: Scores, base: Scores, clusters, expert_cluster, *, n_bootstrap: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Each expert's accuracy gain over its own base model on the questions of its own cluster, with CIs.

    ``base`` holds, column j, expert j's un-tuned base model on the same rows (see :func:`base_columns`).
    Per expert the gain is the mean paired difference (expert right − base right) over its cluster's
    questions, with a percentile bootstrap interval over those questions; ``mean`` averages the experts'
    gains (each resampled independently) — the "own-cluster gain" of the specialisation goal.
    """
    from .evaluation import percentile_interval

    clusters = np.asarray(clusters, dtype=np.int64)
    d = correct_matrix(scores.probs, scores.answer) - correct_matrix(base.probs, base.answer)
    rng = np.random.default_rng(seed)
    per, boots = [], []
    for j, c in enumerate(expert_cluster):
        rows = np.flatnonzero(clusters == c) if c is not None and c >= 0 else np.array([], dtype=np.int64)
        if not rows.size:
            per.append({"n": 0, "gain": None, "ci95": None})
            continue
        boot = d[rows, j][rng.integers(0, rows.size, size=(n_bootstrap, rows.size))].mean(1)
        boots.append(boot)
        per.append({"n": int(rows.size), "gain": float(d[rows, j].mean()),
                    "ci95": [float(x) for x in percentile_interval(boot, level)]})
    gains = [p["gain"] for p in per if p["gain"] is not None]
    mean = None if not boots else {"gain": float(np.mean(gains)),
                                   "ci95": [float(x) for x in percentile_interval(np.mean(boots, 0), level)]}
    return {"experts": per, "mean": mean}
