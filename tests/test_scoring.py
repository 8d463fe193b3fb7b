import hashlib

import numpy as np
import pytest

from moe2lib.core.scores import Scores, letter_bias, task_accuracy, validate
from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.models import experts, scoring


class HashExpert(experts.Expert):
    """A deterministic expert whose letter logits are a hash of the prompt; can stop after some calls."""

    def __init__(self, name="hash", stop_after=None):
        super().__init__("none", name=name)
        self.stop_after = stop_after
        self.prompts_seen = 0

    def letter_logits(self, prompts, n_choices=4):
        if self.stop_after is not None and self.prompts_seen >= self.stop_after:
            raise KeyboardInterrupt("simulated interruption")
        self.prompts_seen += len(prompts)
        rows = [np.frombuffer(hashlib.sha256((self.name + p).encode()).digest()[:n_choices], np.uint8)
                for p in prompts]
        return np.array(rows, dtype=np.float32) / 64

    def encode(self, prompt):
        return prompt.split()


def _questions(n=40):
    subjects = ["algebra", "anatomy", "law"]
    return [loaders.Question(question=f"q{i}?", choices=("w", "x", "y", "z"), answer=i % 4,
                          subject=subjects[i % 3], source=f"t.csv:{i + 1}") for i in range(n)]


def test_resume_after_interruption_gives_the_same_file(tmp_path):
    qs = _questions()
    clean = scoring.score_questions(qs, [HashExpert("a"), HashExpert("b")], tmp_path / "clean.npz",
                                    chunk=8, progress=False)
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        scoring.score_questions(qs, [HashExpert("a"), HashExpert("b", stop_after=16)], out, chunk=8, progress=False)
    assert not out.exists() and (tmp_path / "s.npz.partial").is_dir()
    a, b = HashExpert("a"), HashExpert("b")
    resumed = scoring.score_questions(qs, [a, b], out, chunk=8, progress=False)
    assert a.prompts_seen == 0 and b.prompts_seen == 40 - 16  # only what was missing
    np.testing.assert_array_equal(resumed.probs, clean.probs)
    assert not (tmp_path / "s.npz.partial").exists()
    loaded = Scores.load(out)
    np.testing.assert_array_equal(loaded.probs, clean.probs)
    assert loaded.experts.tolist() == ["a", "b"] and loaded.qid[3] == "t.csv:4"


def test_changed_questions_do_not_reuse_a_stale_partial(tmp_path):
    qs = _questions()
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        scoring.score_questions(qs, [HashExpert("a", stop_after=8)], out, chunk=8, progress=False)
    other = _questions(32)
    e = HashExpert("a")
    scoring.score_questions(other, [e], out, chunk=8, progress=False)
    assert e.prompts_seen == 32


def test_a_retrained_adapter_does_not_reuse_a_stale_partial(tmp_path):
    qs = _questions()
    out = tmp_path / "s.npz"
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"first training")
    first = HashExpert("a", stop_after=16)
    first.adapter = str(adapter)
    with pytest.raises(KeyboardInterrupt):
        scoring.score_questions(qs, [first], out, chunk=8, progress=False)
    adapter.write_bytes(b"second training")  # same name and path, new weights
    again = HashExpert("a")
    again.adapter = str(adapter)
    scoring.score_questions(qs, [again], out, chunk=8, progress=False)
    assert again.prompts_seen == 40


def _scores(**over):
    probs = np.full((3, 2, 4), 0.25, dtype=np.float32)
    base = dict(probs=probs, answer=np.array([0, 1, 2]), task=np.array(["a", "a", "b"]),
                qid=np.array(["1", "2", "3"]), n_tokens=np.ones((3, 2), np.int32), experts=np.array(["x", "y"]))
    base.update(over)
    return Scores(**base)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.__setitem__((1, 0, 2), np.nan), r"probs\[1, 0\] is not finite"),
    (lambda p: p.__setitem__((2, 1), [0.5, 0.7, -0.2, 0.0]), r"probs\[2, 1\] has a negative"),
    (lambda p: p.__setitem__((0, 1, 0), 0.9), r"probs\[0, 1\] sums to 1.65"),
])
def test_bad_probabilities_are_named(tmp_path, change, message):
    s = _scores()
    change(s.probs)
    path = tmp_path / "bad.npz"
    from moe2lib.infra import artifacts
    artifacts.write_npz(path, probs=s.probs, answer=s.answer, subject=s.task, qid=s.qid,
                        n_tokens=s.n_tokens, experts=s.experts)
    with pytest.raises(InputError, match=message) as err:
        Scores.load(path)
    assert "bad.npz" in str(err.value)


def test_shape_mismatch_is_named():
    with pytest.raises(InputError, match="answer has shape"):
        validate(_scores(answer=np.array([0, 1])))


def test_task_accuracy_and_letter_bias_known_answers():
    probs = np.zeros((4, 1, 4), np.float32)
    probs[[0, 1, 2, 3], 0, [0, 0, 0, 3]] = 1  # picks A, A, A, D
    s = Scores(probs, np.array([0, 1, 0, 3]), np.array(["m", "m", "p", "p"]), np.array(list("1234")),
                       np.ones((4, 1), np.int32), np.array(["e"]))
    tasks, acc, chance, counts = task_accuracy(s)
    assert tasks.tolist() == ["m", "p"] and counts.tolist() == [2, 2]
    np.testing.assert_allclose(acc, [[0.5, 1.0]])
    np.testing.assert_allclose(chance, [0.25, 0.25])
    chosen, gold = letter_bias(s)
    np.testing.assert_allclose(chosen, [[0.75, 0, 0, 0.25]])
    np.testing.assert_allclose(gold, [0.5, 0.25, 0, 0.25])


def test_scores_files_keep_their_subject_key(tmp_path):
    """Scores.task is stored under the key the committed scores files have: "subject"."""
    s = _scores()
    s.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert "subject" in f.files and "task" not in f.files
        np.testing.assert_array_equal(f["subject"], s.task)
    np.testing.assert_array_equal(Scores.load(tmp_path / "s.npz").task, s.task)


@pytest.mark.slow  # scores with a model
def test_real_model_scores_mmlu(tmp_path):
    sample = loaders.mmlu_sample(24, seed=0)
    e = experts.make_expert("smollm2-135m-instruct", n_threads=2)
    s = scoring.score_questions(sample, [e], tmp_path / "real.npz", progress=False)
    assert s.probs.shape == (24, 1, 4) and s.experts.tolist() == ["smollm2-135m-instruct"]
    np.testing.assert_allclose(s.probs.sum(-1), 1, atol=1e-5)
    assert (s.n_tokens > 30).all() and s.answer.tolist() == [q.answer for q in sample]
    assert 0 <= s.accuracy()[0] <= 1
