"""Prompt clustering (the paper's §V-A, App. A, Fig. 6): sentence embeddings, k-means, and its figures.

The experts are tuned on clusters of the fine-tuning prompts; every fine-tuning and MMLU prompt is
assigned to its nearest centroid. Embeddings are L2-normalised sentence-transformers vectors (the
paper's mGTE is registered as ``mgte-base``; the packaged default is ``all-minilm-l6-v2``) and are
cached by content hash, because embedding ~30,000 prompts dominates the stage's time on a CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.loaders import DEFAULT_TEMPLATE, Question, format_prompt
from ..errors import InputError, check_int
from ..infra import artifacts
from ..infra.cache import cache_dir
from . import registry


def embedding_cache_dir() -> Path:
    """``<MOE2_CACHE or ~/.cache/moe2>/embeddings``."""
    return cache_dir() / "embeddings"


def embedding_key(texts: Sequence[str], model: str, max_seq_length: int | None = None) -> str:
    """sha256 over the model name, the truncation length (when set) and the texts, in order."""
    h = hashlib.sha256()
    h.update(model.encode("utf-8"))
    if max_seq_length is not None:
        h.update(f"\0max_seq_length={int(max_seq_length)}".encode())
    for t in texts:
        h.update(b"\0")
        h.update(t.encode("utf-8"))
    return h.hexdigest()


def _read_cached(path: Path, n: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] != n or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None
    return arr


def embed_texts(texts: Sequence[str], model: str = "all-minilm-l6-v2", batch_size: int = 64,
                progress: bool = True, max_seq_length: int | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings [n, D] of ``texts``, cached in ``embedding_cache_dir()``.

    ``max_seq_length`` truncates each text to that many model tokens (None: the model's own limit,
    256 for MiniLM); it is part of the cache key. A cached array is used only when its shape fits.
    """
    texts = list(texts)
    if not texts:
        raise InputError("no texts to embed", param="texts")
    if not all(isinstance(t, str) for t in texts):
        raise InputError("texts must be strings", param="texts")
    if max_seq_length is not None and int(max_seq_length) < 8:
        raise InputError(f"must be at least 8 tokens, got {max_seq_length}", param="max_seq_length")
    path = embedding_cache_dir() / f"{embedding_key(texts, model, max_seq_length)}.npy"
    if path.exists():
        cached = _read_cached(path, len(texts))
        if cached is not None:
            return cached
    st = registry.sentence_transformer(model)
    if max_seq_length is not None:
        st.max_seq_length = int(max_seq_length)
    emb = st.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                    normalize_embeddings=True).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb, allow_pickle=False)
    return emb


def embed_questions(questions: Sequence[Question], model: str = "all-minilm-l6-v2",
                    template: str = DEFAULT_TEMPLATE, **options) -> np.ndarray:
    """Embeddings of the questions' formatted prompts (what the experts and the gating network see)."""
    return embed_texts([format_prompt(q, template) for q in questions], model=model, **options)


class PromptClusters:
    """k-means on prompt embeddings (scikit-learn), clusters numbered by size, largest first.

    Numbering by size makes the labels independent of k-means' internal order; ties keep that order.
    """

    def __init__(self, n_clusters: int = 8, seed: int = 0, n_init: int = 10, max_iter: int = 300):
        self.n_clusters = n_clusters
        self.seed = seed
        self.n_init = n_init
        self.max_iter = max_iter

    def fit(self, X, task=None) -> "PromptClusters":
        """k-means on the rows of ``X``; ``task`` is ignored (the paper clusters prompts by embedding alone)."""
        from sklearn.cluster import KMeans

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise InputError(f"X must be (n, D), got shape {X.shape}", param="X")
        check_int(self.n_clusters, "n_clusters", high=len(X))  # at most one cluster per prompt
        km = KMeans(self.n_clusters, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed).fit(X)
        sizes = np.bincount(km.labels_, minlength=self.n_clusters)
        order = np.argsort(-sizes, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.centroids_ = km.cluster_centers_[order].astype(np.float32)
        self.labels_ = rank[km.labels_].astype(np.int64)
        self.sizes_ = sizes[order].astype(np.int64)
        self.inertia_ = float(km.inertia_)
        return self

    def _check(self, X) -> np.ndarray:
        if not hasattr(self, "centroids_"):
            raise InputError("PromptClusters is not fitted; call fit first", param="X")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.centroids_.shape[1]:
            raise InputError(f"X must be (n, {self.centroids_.shape[1]}), got shape {X.shape}", param="X")
        return X

    def transform(self, X) -> np.ndarray:
        """Euclidean distance of each row to each centroid, float32 [n, k]."""
        from sklearn.metrics import pairwise_distances

        return pairwise_distances(self._check(X), self.centroids_).astype(np.float32)

    def predict(self, X) -> np.ndarray:
        """Index of the nearest centroid of each row."""
        return self.transform(X).argmin(1).astype(np.int64)

    def assign(self, X, task=None) -> np.ndarray:
        """The cluster each prompt belongs to: its nearest centroid (the same as :meth:`predict`)."""
        return self.predict(X)


class TaskClusters:
    """Whole tasks grouped into clusters, and a classifier that routes a prompt to one from its embedding.

    A departure from the paper, which clusters prompts by embedding alone: here each cluster is a set of
    tasks, so an expert trains on one or two tasks and becomes a specialist. The tasks' mean prompt
    embeddings are agglomerated by average cosine similarity, most similar first, and no cluster may hold
    more than ``ceil(T / n_clusters)`` of the T tasks. Clusters are numbered by size, largest first (as
    :class:`PromptClusters`). A new prompt's task is not known at inference, so :meth:`predict` uses a
    logistic regression fitted on the training prompts' embeddings and clusters (scikit-learn).
    """

    def __init__(self, n_clusters: int = 8, seed: int = 0, C: float = 1.0):
        self.n_clusters = n_clusters
        self.seed = seed
        self.C = C

    def fit(self, X, task) -> "TaskClusters":
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float32)
        task = np.asarray(task).astype(str)
        if X.ndim != 2 or task.shape != (len(X),):
            raise InputError(f"X must be (n, D) with one task per row, got {X.shape} and {task.shape}", param="X")
        names = sorted(set(task.tolist()))
        if not 1 <= self.n_clusters <= len(names):
            raise InputError(f"must be in 1..{len(names)} (the number of tasks), got {self.n_clusters}",
                             param="n_clusters")
        unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        means = np.stack([unit[task == t].mean(0) for t in names])
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        groups = self._agglomerate(means @ means.T, -(-len(names) // self.n_clusters))
        sizes = np.array([sum(int((task == names[t]).sum()) for t in g) for g in groups])
        order = np.argsort(-sizes, kind="stable")
        self.tasks_ = {names[t]: int(rank) for rank, g in enumerate(groups[i] for i in order) for t in g}
        self.labels_ = np.array([self.tasks_[t] for t in task.tolist()], dtype=np.int64)
        self.sizes_ = sizes[order].astype(np.int64)
        self.centroids_ = np.stack([X[self.labels_ == c].mean(0) for c in range(self.n_clusters)]).astype(np.float32)
        self.inertia_ = float(((X - self.centroids_[self.labels_]) ** 2).sum())
        self.router_ = LogisticRegression(C=self.C, max_iter=2000, random_state=self.seed).fit(X, self.labels_)
        return self

    def _agglomerate(self, sim: np.ndarray, cap: int) -> list[list[int]]:
        """Merge the pair of groups with the largest mean similarity, within ``cap`` tasks, until k are left
        (the cap grows by one where no pair fits it)."""
        groups = [[t] for t in range(len(sim))]
        while len(groups) > self.n_clusters:
            best, pair = -np.inf, None
            for a in range(len(groups)):
                for b in range(a + 1, len(groups)):
                    if len(groups[a]) + len(groups[b]) <= cap:
                        s = sim[np.ix_(groups[a], groups[b])].mean()
                        if s > best:
                            best, pair = s, (a, b)
            if pair is None:  # every merge would pass the cap (e.g. groups of 2 with a cap of 3): widen it
                cap += 1
                continue
            a, b = pair
            groups[a] = sorted(groups[a] + groups.pop(b))
        return groups

    def cluster_of(self, task) -> np.ndarray:
        """The cluster of each task name (InputError for a task not seen by ``fit``)."""
        task = np.atleast_1d(np.asarray(task).astype(str))
        unknown = sorted(set(task.tolist()) - set(self.tasks_))
        if unknown:
            raise InputError(f"tasks {unknown} were not clustered; known: {', '.join(sorted(self.tasks_))}",
                             param="task")
        return np.array([self.tasks_[t] for t in task.tolist()], dtype=np.int64)

    def transform(self, X) -> np.ndarray:
        """Euclidean distance of each row to each cluster's mean embedding, float32 [n, k]."""
        from sklearn.metrics import pairwise_distances

        return pairwise_distances(np.asarray(X, dtype=np.float32), self.centroids_).astype(np.float32)

    def predict(self, X) -> np.ndarray:
        """The cluster a prompt is routed to from its embedding alone (the fitted logistic regression)."""
        return self.router_.predict(np.asarray(X, dtype=np.float32)).astype(np.int64)

    def assign(self, X, task) -> np.ndarray:
        """The cluster each prompt belongs to: its task's (``X`` is not needed)."""
        return self.cluster_of(task)


CLUSTERINGS = ("embedding", "task")


def make_clusters(cluster_by: str, n_clusters: int, seed: int = 0, n_init: int = 10):
    """Unfitted clusters of the experts' prompts: "embedding", k-means on embeddings (:class:`PromptClusters`,
    the paper's), or "task", whole tasks grouped (:class:`TaskClusters`; ``n_init`` unused)."""
    if cluster_by == "embedding":
        return PromptClusters(n_clusters, seed=seed, n_init=n_init)
    if cluster_by == "task":
        return TaskClusters(n_clusters, seed=seed)
    raise InputError(f"unknown clustering {cluster_by!r}; known: {', '.join(CLUSTERINGS)}", param="cluster_by")


def silhouette(X, labels, sample: int = 3000, seed: int = 0) -> float:
    """Silhouette score (euclidean) on a seeded sample of at most ``sample`` rows."""
    from sklearn.metrics import silhouette_score

    X = np.asarray(X)
    return float(silhouette_score(X, labels, sample_size=min(sample, len(X)), random_state=seed))


def umap_2d(X, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP (cosine metric) of the rows; seeded and single-threaded, so it is reproducible."""
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value 1 overridden.*")
        X = np.asarray(X, dtype=np.float32)
        if len(X) < 4:
            raise InputError(f"UMAP needs at least 4 points, got {len(X)}", param="X")
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(X) - 1), min_dist=min_dist, metric="cosine",
                            random_state=seed, n_jobs=1)
        return reducer.fit_transform(X).astype(np.float32)


def task_cluster_matrix(tasks: Sequence[str], clusters, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted tasks[S], share[S, k]): the share of each task's prompts that fall in each cluster."""
    tasks = np.asarray(tasks)
    clusters = np.asarray(clusters, dtype=np.int64)
    if tasks.shape != clusters.shape:
        raise InputError(f"tasks {tasks.shape} and clusters {clusters.shape} differ in shape",
                         param="clusters")
    if len(clusters) and (clusters.min() < 0 or clusters.max() >= k):
        raise InputError(f"cluster ids must be in 0..{k - 1}", param="clusters")
    names, inverse = np.unique(tasks, return_inverse=True)
    counts = np.zeros((len(names), k))
    np.add.at(counts, (inverse, clusters), 1)
    return names, counts / counts.sum(1, keepdims=True)


def top_tasks(tasks: Sequence[str], clusters, k: int, n: int = 3) -> list[list[tuple[str, float]]]:
    """Per cluster, the ``n`` tasks with most prompts in it and their share of the cluster."""
    tasks = np.asarray(tasks)
    clusters = np.asarray(clusters)
    out = []
    for c in range(k):
        names, counts = np.unique(tasks[clusters == c], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:n]
        out.append([(str(names[i]), float(counts[i] / counts.sum())) for i in order])
    return out


PROMPT_STOP_WORDS = frozenset({"question", "questions", "following", "choice", "choices", "answer", "answers",
                               "passage", "statement", "best", "likely", "true", "correct", "does", "used"})


def cluster_terms(texts: Sequence[str], clusters, k: int, n: int = 4, min_count: int = 3) -> list[list[str]]:
    """Per cluster, its ``n`` most characteristic words by class-based TF-IDF (as in BERTopic).

    score(t, c) = tf(t, c) / words(c) * log(1 + mean words per cluster / tf(t, all)): frequent in the
    cluster and rare elsewhere. Words seen fewer than ``min_count`` times in all texts (names) are ignored.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

    clusters = np.asarray(clusters, dtype=np.int64)
    vec = CountVectorizer(stop_words=sorted(ENGLISH_STOP_WORDS | PROMPT_STOP_WORDS), token_pattern=r"(?u)\b[a-zA-Z]{3,}\b")
    try:
        counts = vec.fit_transform(texts)
    except ValueError:  # no words at all
        return [[] for _ in range(k)]
    tf = np.zeros((k, counts.shape[1]))
    for c in range(k):
        tf[c] = np.asarray(counts[clusters == c].sum(0)).ravel()
    total = tf.sum(0)
    words = tf.sum(1, keepdims=True)
    score = tf / np.maximum(words, 1) * np.log1p(words.mean() / np.maximum(total, 1))
    score[:, total < min_count] = 0
    vocab = np.array(vec.get_feature_names_out())
    return [list(vocab[np.argsort(-row, kind="stable")[:n]][row[np.argsort(-row, kind="stable")[:n]] > 0])
            for row in score]


def umap_figure(xy, clusters, k: int, labels: Sequence[str] | None = None,
                title: str = "Prompts by cluster (UMAP)"):
    """The paper's Fig. 6: a 2-D UMAP scatter of prompts coloured by their cluster."""
    import matplotlib.pyplot as plt

    xy = np.asarray(xy)
    clusters = np.asarray(clusters)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for c in range(k):
        sel = clusters == c
        name = f"{c}: {labels[c]}" if labels is not None else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, color=cmap(c % cmap.N), label=f"{name} ({sel.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), title="cluster")
    ax.set_title(f"{title} (n={len(xy)})")
    return fig


def task_heatmap(tasks: Sequence[str], clusters, k: int, labels: Sequence[str] | None = None,
                 title: str = "tasks x prompt clusters"):
    """Heatmap of each task's share per cluster, tasks grouped by their dominant cluster."""
    import matplotlib.pyplot as plt

    names, share = task_cluster_matrix(tasks, clusters, k)
    dominant = share.argmax(1)
    order = np.lexsort((-share[np.arange(len(names)), dominant], dominant))
    fig, ax = plt.subplots(figsize=(0.75 * k + 5, 0.17 * len(names) + 2))
    im = ax.imshow(share[order], aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), [names[i].replace("_", " ") for i in order], fontsize=6)
    xt = [f"{c}\n{labels[c]}" if labels is not None else str(c) for c in range(k)]
    ax.set_xticks(range(k), xt, fontsize=6, rotation=90 if labels is not None else 0)
    for y, i in enumerate(order):
        ax.add_patch(plt.Rectangle((dominant[i] - 0.5, y - 0.5), 1, 1, fill=False, ec="tab:blue", lw=0.6))
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("share of the task's prompts")
    ax.set_xlabel("cluster")
    ax.set_title(title)
    return fig


def cluster_label(terms: Sequence[str], tasks: Sequence[tuple[str, float]], n_tasks: int = 1) -> str:
    """A short column label: the top task(s) and top TF-IDF terms of a cluster."""
    top = ", ".join(t.replace("_", " ") for t, _ in tasks[:n_tasks])
    return f"{top} | {' '.join(terms)}" if terms else top


def specialisation_heatmap(delta, counts, experts: Sequence[str], expert_clusters: Sequence[int | None],
                           title: str = "Expert accuracy minus its base model's, per prompt cluster"):
    """Heatmap of accuracy deltas [K, k] (percentage points), each expert's own cluster boxed."""
    import matplotlib.pyplot as plt

    delta = np.asarray(delta, dtype=float) * 100
    k = delta.shape[1]
    lim = max(5.0, float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 5.0)
    fig, ax = plt.subplots(figsize=(0.7 * k + 3.5, 0.45 * len(experts) + 1.8))
    im = ax.imshow(delta, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
    for j, c in enumerate(expert_clusters):
        if c is not None and 0 <= c < k:
            ax.add_patch(plt.Rectangle((c - 0.5, j - 0.5), 1, 1, fill=False, ec="k", lw=2))
    for j in range(delta.shape[0]):
        for c in range(k):
            if np.isfinite(delta[j, c]):
                ax.text(c, j, f"{delta[j, c]:+.0f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(experts)), [str(e) for e in experts], fontsize=7)
    ax.set_xticks(range(k), [f"{c}\n(n={n})" for c, n in enumerate(counts)], fontsize=7)
    ax.set_xlabel("prompt cluster (boxed: the expert's own)")
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("accuracy difference (points)")
    ax.set_title(title, fontsize=9)
    return fig
