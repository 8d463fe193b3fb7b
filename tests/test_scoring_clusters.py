import numpy as np
import pytest

from moe2lib.core.scores import (
    Scores,
    align,
    cluster_accuracy,
    concat_experts,
    concat_rows,
    lookup_clusters,
    own_cluster_accuracy,
    own_minus_other_gain,
)
from moe2lib.errors import InputError
from moe2lib.models import scoring


def _scores(picks, answer, experts, qid=None):
    """Scores whose argmax letters are ``picks[N, K]`` (prob 0.7 on the pick, 0.1 elsewhere)."""
    picks = np.asarray(picks)
    n, k = picks.shape
    probs = np.full((n, k, 4), 0.1, np.float32)
    for i in range(n):
        for j in range(k):
            probs[i, j, picks[i, j]] = 0.7
    qid = np.array(qid if qid is not None else [f"q.csv:{i}" for i in range(n)])
    return Scores(probs, np.asarray(answer), np.array(["s"] * n), qid,
                          np.ones((n, k), np.int32), np.array(experts))


# 6 questions in clusters 0,0,1,1,2,2; answers all A (0)
ANSWER = [0, 0, 0, 0, 0, 0]
CLUSTERS = [0, 0, 1, 1, 2, 2]


def test_cluster_accuracy_known_answer():
    # expert e0 right on questions 0,1,2; expert e1 right on 4,5
    s = _scores([[0, 1], [0, 1], [0, 1], [1, 1], [1, 0], [1, 0]], ANSWER, ["e0", "e1"])
    acc, counts = cluster_accuracy(s, CLUSTERS, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert np.allclose(acc[:, :3], [[1, 0.5, 0], [0, 0, 1]]) and np.isnan(acc[:, 3]).all()
    own, other = own_cluster_accuracy(s, CLUSTERS, [0, 2])
    assert np.allclose(own, [1.0, 1.0]) and np.allclose(other, [0.25, 0.0])
    own, other = own_cluster_accuracy(s, CLUSTERS, [None, -1])
    assert np.isnan(own).all() and np.isnan(other).all()
    with pytest.raises(InputError, match="0..1"):
        cluster_accuracy(s, CLUSTERS, 2)


def test_align_and_lookup_by_qid():
    s = _scores([[0], [1], [2]], [0, 1, 1], ["e"], qid=["a:1", "b:2", "c:3"])
    r = align(s, ["c:3", "a:1", "b:2"])
    assert r.qid.tolist() == ["c:3", "a:1", "b:2"] and r.answer.tolist() == [1, 0, 1]
    assert r.probs[:, 0].argmax(-1).tolist() == [2, 0, 1]
    with pytest.raises(InputError, match="1 missing") as err:
        align(s, ["c:3", "a:1", "z:9"])
    assert err.value.param == "qid"
    with pytest.raises(InputError, match="extra"):
        align(s, ["c:3", "a:1"])
    assert lookup_clusters(["b:2", "a:1"], ["a:1", "b:2", "c:3"], [5, 6, 7]).tolist() == [6, 5]
    with pytest.raises(InputError, match="no cluster"):
        lookup_clusters(["x:1"], ["a:1"], [0])


def test_concat_experts_and_base_columns():
    a = _scores([[0], [1]], [0, 1], ["smollm2-135m-instruct"])
    b = _scores([[1, 1], [1, 0]], [0, 1], ["x0", "x1"])
    both = concat_experts(a, b)
    assert both.experts.tolist() == ["smollm2-135m-instruct", "x0", "x1"]
    assert np.allclose(both.accuracy(), [1.0, 0.5, 0.0])
    assert scoring.base_columns(both, ["x1", "smollm2-135m-instruct"]).tolist() == [2, 0]
    with pytest.raises(InputError, match="gemma3-270m"):
        scoring.base_columns(a, ["gemma3-270m"])
    with pytest.raises(InputError, match="same questions"):
        concat_experts(a, align(a, a.qid[::-1]))


def test_concat_rows_undoes_a_split_into_shards():
    s = _scores([[0, 1], [1, 1], [2, 0], [3, 2], [0, 0]], [0, 1, 2, 3, 0], ["e0", "e1"])
    back = concat_rows(s.subset([0, 1]), s.subset([2]), s.subset([3, 4]))
    for field in ("probs", "answer", "task", "qid", "n_tokens", "experts"):
        np.testing.assert_array_equal(getattr(back, field), getattr(s, field))
    with pytest.raises(InputError, match="same experts"):
        concat_rows(s.subset([0]), _scores([[0]], [0], ["e0"], qid=["z:1"]))


def test_own_minus_other_gain_against_the_experts_base_columns():
    # e0 (cluster 0) right on 0,1,2; e1 (cluster 2) right on 4,5. Base b right on questions 2 and 4 only.
    s = _scores([[0, 1], [0, 1], [0, 1], [1, 1], [1, 0], [1, 0]], ANSWER, ["e0", "e1"])
    b = _scores([[1], [1], [0], [1], [0], [1]], ANSWER, ["smollm2-135m-instruct"])
    base = scoring.base_as_experts(b, s, ["smollm2-135m-instruct", "smollm2-135m-instruct"])
    assert base.experts.tolist() == ["e0", "e1"] and np.allclose(base.accuracy(), [1 / 3, 1 / 3])
    # e0: own 1 - 0, other 0.25 - 0.5 -> +1.25; e1: own 1 - 0.5, other 0 - 0.25 -> +0.75
    assert np.allclose(own_minus_other_gain(s, base, CLUSTERS, [0, 2]), [1.25, 0.75])
    assert np.isnan(own_minus_other_gain(s, base, CLUSTERS, [None, 1])[0])

