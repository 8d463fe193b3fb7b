"""The scores artifact: each expert's distribution over each question's choices, and what is read off it.

A :class:`Scores` holds ``probs[N, K, C]`` (each expert's distribution over the choices), ``answer[N]``,
``task[N]`` (each question's task; for MMLU questions scored by their letter, its subject; stored under the
key ``subject``), ``qid[N]``, ``n_tokens[N, K]`` (prompt length in each expert's tokens), ``experts[K]``
and, where questions have different numbers of choices, ``n_choices[N]`` (probs padded with zeros).
One ``.npz`` file, no pickle, checked on load and save. Below it: accuracy (and chance) per task, the
letter bias, accuracy per prompt cluster and on each expert's own cluster against its base model (the
specialisation measures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..infra import artifacts
from .stats import bootstrap_means, percentile_interval


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
    task: np.ndarray  # saved as "subject", the key the scores files have always had
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
        return Scores(self.probs[rows], self.answer[rows], self.task[rows], self.qid[rows],
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
        return artifacts.write_npz(path, probs=self.probs, answer=self.answer, subject=self.task,
                                   qid=self.qid, n_tokens=self.n_tokens, experts=self.experts, **extra)

    @classmethod
    def load(cls, path) -> "Scores":
        data = artifacts.read_npz(path)
        missing = [k for k in ("probs", "answer", "subject", "qid", "n_tokens", "experts") if k not in data]
        if missing:
            raise InputError(f"scores file lacks {missing}", path=path)
        scores = cls(data["probs"], data["answer"], data["subject"], data["qid"], data["n_tokens"], data["experts"],
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
    for name, arr, shape in (("answer", s.answer, (n,)), ("task", s.task, (n,)), ("qid", s.qid, (n,)),
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


def letter_bias(scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """How often each expert picks each letter (K, C), beside how often each letter is correct (C,)."""
    c = scores.probs.shape[-1]
    picks = scores.probs.argmax(-1)
    chosen = np.stack([(picks == i).mean(0) for i in range(c)], axis=-1)
    gold = np.bincount(scores.answer, minlength=c) / scores.n
    return chosen, gold


def chance_per_question(scores: Scores) -> np.ndarray:
    """1 / (number of choices) of each question → (N,)."""
    c = scores.probs.shape[-1]
    return 1.0 / (np.full(scores.n, c) if scores.n_choices is None else np.asarray(scores.n_choices))


def task_accuracy(scores: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per task, each expert's accuracy and chance: (tasks[T], accuracy[K, T], chance[T], questions per task[T])."""
    tasks, inverse, counts = np.unique(scores.task, return_inverse=True, return_counts=True)
    correct = correct_matrix(scores.probs, scores.answer)
    sums = np.zeros((len(tasks), correct.shape[1]))
    np.add.at(sums, inverse, correct)
    chance = np.bincount(inverse, weights=chance_per_question(scores)) / counts
    return tasks, (sums / counts[:, None]).T, chance, counts


# --- specialisation: accuracy per prompt cluster, against the base models -----------------------------

def align(scores: Scores, qid, path=None) -> Scores:
    """``scores`` with its rows reordered to ``qid``; the two must hold the same questions (else InputError)."""
    qid = np.asarray(qid).astype(str)
    rows = align_rows(qid, scores.qid, path=path, hint="; score both on the same questions")
    extra = sorted(set(scores.qid.astype(str).tolist()) - set(qid.tolist()))
    if extra or len(set(qid.tolist())) != len(qid):
        raise InputError(f"question ids do not match: {len(extra)} extra (e.g. {extra[:3]}) or repeated; "
                         "score both on the same questions", path=path, param="qid")
    return scores.subset(rows)


def concat_experts(*parts: Scores) -> Scores:
    """One Scores with the experts of all parts side by side; every part must have the same rows (qid order)."""
    first = parts[0]
    for p in parts[1:]:
        if not np.array_equal(p.qid, first.qid) or not np.array_equal(p.answer, first.answer):
            raise InputError("scores to concatenate must list the same questions in the same order", param="qid")
    return Scores(np.concatenate([p.probs for p in parts], 1), first.answer, first.task, first.qid,
                  np.concatenate([p.n_tokens for p in parts], 1), np.concatenate([p.experts for p in parts]),
                  first.n_choices)


def concat_rows(*parts: Scores) -> Scores:
    """One Scores with the rows of all parts one after another; every part must have the same experts and width."""
    first = parts[0]
    for p in parts[1:]:
        if p.experts.tolist() != first.experts.tolist() or p.probs.shape[1:] != first.probs.shape[1:]:
            raise InputError("scores to stack must have the same experts and choice width", param="experts")
    if len({p.n_choices is None for p in parts}) > 1:
        raise InputError("scores to stack must all record n_choices or none", param="n_choices")
    return Scores(np.concatenate([p.probs for p in parts]), np.concatenate([p.answer for p in parts]),
                  np.concatenate([p.task for p in parts]), np.concatenate([p.qid for p in parts]),
                  np.concatenate([p.n_tokens for p in parts]), first.experts,
                  None if first.n_choices is None else np.concatenate([p.n_choices for p in parts]))


def lookup_clusters(qid, cluster_qid, cluster, path=None) -> np.ndarray:
    """The cluster of each ``qid`` from a (cluster_qid, cluster) table such as clusters.npz's eval_qid and
    eval_cluster."""
    rows = align_rows(qid, cluster_qid, path=path, param="cluster_qid",
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


def own_minus_other_gain(scores: Scores, base: Scores, clusters, expert_cluster) -> np.ndarray:
    """Each expert's specialisation: its gain over its base model on its own cluster's questions minus the
    same gain on the other clusters' questions, ``(own_e - own_b) - (other_e - other_b)`` (NaN where a side
    is empty). ``base`` holds expert j's base model in column j, as in :func:`own_cluster_gain`."""
    own_e, other_e = own_cluster_accuracy(scores, clusters, expert_cluster)
    own_b, other_b = own_cluster_accuracy(base, clusters, expert_cluster)
    return (own_e - own_b) - (other_e - other_b)


def own_cluster_gain(scores: Scores, base: Scores, clusters, expert_cluster, *, n_bootstrap: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Each expert's accuracy gain over its own base model on the questions of its own cluster, with CIs.

    ``base`` holds, column j, expert j's un-tuned base model on the same rows (see :func:`base_columns`).
    Per expert the gain is the mean paired difference (expert right − base right) over its cluster's
    questions, with a percentile bootstrap interval over those questions; ``mean`` averages the experts'
    gains (each resampled independently) — the "own-cluster gain" of the specialisation goal.
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    d = correct_matrix(scores.probs, scores.answer) - correct_matrix(base.probs, base.answer)
    rng = np.random.default_rng(seed)
    per, boots = [], []
    for j, c in enumerate(expert_cluster):
        rows = np.flatnonzero(clusters == c) if c is not None and c >= 0 else np.array([], dtype=np.int64)
        if not rows.size:
            per.append({"n": 0, "gain": None, "ci95": None})
            continue
        boot = bootstrap_means(d[rows, j], n_bootstrap, rng, resample="indices")[0]
        boots.append(boot)
        per.append({"n": int(rows.size), "gain": float(d[rows, j].mean()),
                    "ci95": [float(x) for x in percentile_interval(boot, level)]})
    gains = [p["gain"] for p in per if p["gain"] is not None]
    mean = None if not boots else {"gain": float(np.mean(gains)),
                                   "ci95": [float(x) for x in percentile_interval(np.mean(boots, 0), level)]}
    return {"experts": per, "mean": mean}
