import numpy as np
import pytest

from moe2lib.data import loaders
from moe2lib.errors import InputError, ResourceUnavailable
from moe2lib.models import clustering, registry


def _blobs(sizes=(60, 40, 25), dim=16, seed=0):
    """Well separated blobs: centres at distance 10, noise 0.1; labels in blob order."""
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(dim)[: len(sizes)]
    X = np.concatenate([c + 0.1 * rng.standard_normal((n, dim)) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm], centres


def test_kmeans_recovers_separated_blobs_numbered_by_size():
    X, y, centres = _blobs()
    pc = clustering.PromptClusters(n_clusters=3, seed=0, n_init=3).fit(X)
    # blobs have sizes 60 > 40 > 25, so the size numbering gives back the blob index itself
    assert np.array_equal(pc.labels_, y)
    assert pc.sizes_.tolist() == [60, 40, 25]
    assert np.abs(pc.centroids_ - centres).max() < 0.1 and pc.centroids_.dtype == np.float32
    assert np.array_equal(pc.predict(X), y)
    d = pc.transform(X)
    assert d.shape == (125, 3) and np.allclose(d.min(1), np.linalg.norm(X - pc.centroids_[y], axis=1), atol=1e-4)
    new = centres[[2, 0]] + 0.05
    assert pc.predict(new).tolist() == [2, 0]


def test_kmeans_is_seed_deterministic():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 8)).astype(np.float32)  # no structure: the seed decides
    a = clustering.PromptClusters(5, seed=3, n_init=2).fit(X)
    b = clustering.PromptClusters(5, seed=3, n_init=2).fit(X)
    assert np.array_equal(a.labels_, b.labels_) and np.array_equal(a.centroids_, b.centroids_)
    assert a.sizes_.sum() == 300 and (np.diff(a.sizes_) <= 0).all()


def test_kmeans_bad_input():
    with pytest.raises(InputError, match="n_clusters"):
        clustering.PromptClusters(10).fit(np.zeros((5, 3)))
    with pytest.raises(InputError, match="not fitted"):
        clustering.PromptClusters(2).predict(np.zeros((5, 3)))
    pc = clustering.PromptClusters(2, n_init=1).fit(np.r_[np.zeros((3, 3)), np.ones((3, 3))])
    with pytest.raises(InputError, match=r"\(n, 3\)"):
        pc.predict(np.zeros((2, 4)))


def test_task_cluster_matrix_and_labels():
    tasks = ["bio", "bio", "bio", "law", "law", "math"]
    clusters = [0, 0, 1, 2, 2, 1]
    names, share = clustering.task_cluster_matrix(tasks, clusters, 3)
    assert names.tolist() == ["bio", "law", "math"]
    assert np.allclose(share, [[2 / 3, 1 / 3, 0], [0, 0, 1], [0, 1, 0]])
    assert clustering.top_tasks(tasks, clusters, 3, n=1) == [[("bio", 1.0)], [("bio", 0.5)], [("law", 1.0)]]
    with pytest.raises(InputError, match="0..2"):
        clustering.task_cluster_matrix(tasks, [0, 0, 1, 3, 2, 1], 3)
    texts = ["cell membrane protein", "cell protein enzyme", "court contract law", "contract court appeal"]
    terms = clustering.cluster_terms(texts, [0, 0, 1, 1], 2, n=2, min_count=1)
    assert set(terms[0]) <= {"cell", "protein", "membrane", "enzyme"} and "cell" in terms[0]
    assert set(terms[1]) <= {"court", "contract", "law", "appeal"} and "contract" in terms[1]
    assert clustering.cluster_terms(texts, [0, 0, 1, 1], 2, n=2, min_count=3) == [[], []]  # all too rare


@pytest.mark.slow  # UMAP compiles with numba first (~30 s)
def test_umap_is_seeded_and_figures_draw():
    import matplotlib
    matplotlib.use("Agg")
    X, y, _ = _blobs((30, 20, 15), dim=8)
    a, b = clustering.umap_2d(X, seed=0), clustering.umap_2d(X, seed=0)
    assert a.shape == (65, 2) and np.array_equal(a, b)
    # blobs stay apart in the map: every point is nearer its own blob's mean than any other's
    means = np.stack([a[y == c].mean(0) for c in range(3)])
    assert (np.linalg.norm(a[:, None] - means[None], axis=2).argmin(1) == y).all()
    fig = clustering.umap_figure(a, y, 3, labels=["x", "y", "z"])
    assert len(fig.axes[0].collections) == 3
    fig = clustering.task_heatmap(np.array(["s1", "s2", "s3"])[y], y, 3)
    assert fig.axes[0].get_images()[0].get_array().shape == (3, 3)


@pytest.mark.slow  # loads the embedding model (torch)
def test_embedding_cache_skips_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    calls = []
    real = registry.sentence_transformer

    def counting(name, *a, **kw):
        calls.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(registry, "sentence_transformer", counting)
    texts = ["The cat sat on the mat.", "Interest rates rose again."]
    first = clustering.embed_texts(texts, progress=False)
    again = clustering.embed_texts(texts, progress=False)
    assert calls == ["all-minilm-l6-v2"] and np.array_equal(first, again)
    assert first.dtype == np.float32 and first.shape == (2, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    cached = list((tmp_path / "embeddings").glob("*.npy"))
    assert [p.stem for p in cached] == [clustering.embedding_key(texts, "all-minilm-l6-v2")]
    # a cache file of the wrong shape is ignored and rewritten
    np.save(cached[0], np.zeros((3, 384), np.float32))
    assert np.allclose(clustering.embed_texts(texts, progress=False), first, atol=1e-6) and len(calls) == 2
    # other texts, truncation or order are other keys
    clustering.embed_texts(texts[::-1], progress=False)
    assert len(calls) == 3 and len(list((tmp_path / "embeddings").glob("*.npy"))) == 2


@pytest.mark.slow  # loads the embedding model (torch)
def test_paraphrases_are_closer_than_unrelated_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    texts = ["What is the capital city of France?", "Which city is the capital of France?",
             "How do plants turn sunlight into energy?", "Explain how photosynthesis works in plants.",
             "The defendant breached the contract.", "The accused party violated the agreement."]
    e = clustering.embed_texts(texts, progress=False)
    sim = e @ e.T
    for i in range(0, 6, 2):
        others = [j for j in range(6) if j not in (i, i + 1)]
        assert sim[i, i + 1] > sim[i, others].max() + 0.2
        assert sim[i + 1, i] > sim[i + 1, others].max() + 0.2


@pytest.mark.slow  # loads the embedding model (torch)
def test_embed_questions_uses_the_prompt_and_mgte_is_selectable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    q = loaders.Question("What is 2+2?", ("3", "4", "5", "6"), 1, "elementary_mathematics", "x.csv:1")
    e = clustering.embed_questions([q], progress=False)
    assert np.array_equal(e, clustering.embed_texts([loaders.format_prompt(q)], progress=False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MOE2_MODEL_MGTE_BASE", raising=False)
    with pytest.raises(ResourceUnavailable, match="MOE2_MODEL_MGTE_BASE"):
        clustering.embed_texts(["x"], model="mgte-base", progress=False)
    with pytest.raises(InputError, match="unknown model"):
        clustering.embed_texts(["x"], model="no-such-model", progress=False)


def _task_blobs(seed=0, per_task=30):
    """Six tasks in three well-separated pairs of nearby directions, 9-dimensional."""
    rng = np.random.default_rng(seed)
    centres = {}
    for pair in range(3):
        base = np.zeros(9)
        base[pair] = 10.0
        for j in range(2):
            c = base.copy()
            c[3 + 2 * pair + j] = 3.0
            centres[f"t{pair}{j}"] = c
    X = np.concatenate([c + rng.normal(0, 0.3, (per_task, 9)) for c in centres.values()]).astype(np.float32)
    task = np.repeat(list(centres), per_task)
    return X, task


def test_task_clusters_group_similar_whole_tasks_and_route_new_prompts():
    X, task = _task_blobs()
    tc = clustering.TaskClusters(3, seed=0).fit(X, task)
    for pair in range(3):
        assert tc.cluster_of(f"t{pair}0")[0] == tc.cluster_of(f"t{pair}1")[0]  # nearby tasks share a cluster
    assert sorted(tc.cluster_of([f"t{p}0" for p in range(3)]).tolist()) == [0, 1, 2]
    assert np.array_equal(tc.labels_, tc.cluster_of(task)) and tc.sizes_.tolist() == [60, 60, 60]
    X_new, task_new = _task_blobs(seed=1)
    assert (tc.predict(X_new) == tc.cluster_of(task_new)).mean() > 0.95  # routed without the task label
    assert tc.transform(X_new).shape == (len(X_new), 3)
    # at most ceil(6 / 4) = 2 tasks per cluster: the closest pairs merge first, two tasks stay alone
    four = clustering.TaskClusters(4).fit(X, task)
    assert sorted(np.bincount(four.cluster_of(sorted(set(task))), minlength=4).tolist()) == [1, 1, 2, 2]
    with pytest.raises(InputError, match="n_clusters"):
        clustering.TaskClusters(7).fit(X, task)
    with pytest.raises(InputError, match="not clustered"):
        tc.cluster_of("t9")


def test_task_clusters_cap_grows_where_no_pair_fits():
    """Ten tasks into four clusters (cap 3): once five groups of two are left, a group of four is allowed."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 6)).astype(np.float32)
    task = np.repeat([f"t{i}" for i in range(10)], 10)
    tc = clustering.TaskClusters(4).fit(X, task)
    assert len(set(tc.tasks_.values())) == 4 and sum(np.bincount(list(tc.tasks_.values()))) == 10
