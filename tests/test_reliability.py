"""Crash safety under a real SIGKILL, and input validation whose errors say where to look.

The crash tests start scoring, LoRA fine-tuning or a pipeline stage in a child process, kill it with
SIGKILL once it has saved some work (a checkpoint, a finished expert), then check that nothing is half
written, that the interrupted stage is not marked complete, and that a rerun reuses the saved work and
ends with the same result as a run that was never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moe2lib.core.scores import Scores
from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.infra import artifacts
from moe2lib.models import experts, scoring
from moe2lib.pipeline import config, runner

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- helpers of the crash tests

class _KillWhen(threading.Thread):
    """A child Python running ``code``, SIGKILLed from this thread as soon as ``condition`` holds.

    ``beside()`` meanwhile computes the test's uninterrupted reference on the other core, then waits for the
    kill and fails the test (with the child's log) if the child ended first or took too long.
    """

    def __init__(self, code: str, *args, condition, log: Path, timeout: float = 300):
        super().__init__(daemon=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        with open(log, "wb") as out:  # the child is this checkout's code, and can import this test module
            self.proc = subprocess.Popen([sys.executable, "-c", prelude + code, *map(str, args)],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.condition, self.log, self.timeout, self.error = condition, log, timeout, None
        self.start()

    def run(self):
        t0 = time.time()
        try:
            while not self.condition():
                if self.proc.poll() is not None:
                    self.error = f"the child ended (rc {self.proc.returncode}) before it was to be killed"
                    return
                if time.time() - t0 > self.timeout:
                    self.error = "timed out waiting for the child"
                    break
                time.sleep(0.02)
            _kill(self.proc)
        except BaseException as exc:  # reported by beside(), in the test's thread
            self.error = repr(exc)

    def beside(self, reference, *args):
        """``reference(*args)`` (the uninterrupted run, on the other core), then wait for the kill; if the
        reference fails, the child is killed at once and the failure raised."""
        try:
            result = reference(*args)
        except BaseException:
            self.condition = lambda: True
            self.join()
            raise
        self.join()
        if self.error:
            pytest.fail(f"{self.error}:\n{self.log.read_text(errors='replace')[-3000:]}")
        assert self.proc.returncode == -signal.SIGKILL
        return result


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (e.g. the Jupyter kernel papermill starts), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child, then its own children (by id), and wait until none of them can still write."""
    below = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t0 = time.time()
    while not all(_gone(pid) for pid in below) and time.time() - t0 < 30:
        time.sleep(0.02)


def _is_temporary(rel: Path) -> bool:
    """A file or folder an atomic write or save builds before renaming it into place (``.<name>.*.tmp*``)."""
    return any(part.startswith(".") and ".tmp" in part for part in rel.parts)


def _results(folder: Path) -> list[str]:
    """The result files under ``folder`` (temporaries left by a kill excluded), each checked to be whole."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if _is_temporary(rel):
            continue
        if path.suffix in (".json", ".ipynb"):
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".npz":
            artifacts.read_npz(path)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            load_file(str(path))
        out.append(str(rel))
    return out


# --------------------------------------------------------------------------- (a) scoring

N_SCORED = 8


def short_questions(split: str, n: int) -> list[loaders.Question]:
    """The ``n`` questions of a split with the shortest prompts: fast to score and to train on."""
    return sorted(loaders.load_mmlu(split), key=lambda q: len(loaders.format_prompt(q)))[:n]


def score_short(out_path, expert=None) -> Scores:
    """Score the shortest MMLU test questions with SmolLM2, checkpointing every 2 questions."""
    expert = expert or experts.make_expert(MODEL, n_threads=1, weights="F16")
    return scoring.score_questions(short_questions("test", N_SCORED), [expert], out_path, chunk=2, progress=False)


@pytest.mark.slow
def test_scoring_killed_mid_way_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "scores.npz"
    part = tmp_path / "scores.npz.partial"
    child = _KillWhen("import test_reliability as t; t.score_short(sys.argv[1])", out,
                      condition=lambda: (part / "expert0.npz").exists(), log=tmp_path / "child.log")
    clean = child.beside(score_short, tmp_path / "clean.npz")  # the uninterrupted reference

    assert not out.exists()  # the final file is written only when every question is scored
    assert _results(part) == ["expert0.npz", "manifest.json"]  # both whole; a temporary is no result
    done = len(artifacts.read_npz(part / "expert0.npz")["probs"])
    assert 0 < done < N_SCORED

    expert = experts.make_expert(MODEL, n_threads=1, weights="F16")
    asked = []
    real = expert.choice_probs
    expert.choice_probs = lambda prompts, c: (asked.extend(prompts), real(prompts, c))[1]
    resumed = score_short(out, expert)
    prompts = [loaders.format_prompt(q) for q in short_questions("test", N_SCORED)]
    assert asked == prompts[done:]  # the checkpoint's rows were not scored again
    assert not part.exists()

    loaded = Scores.load(out)
    for key in ("probs", "n_tokens", "answer", "qid", "experts"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(clean, key), err_msg=key)
        np.testing.assert_array_equal(getattr(resumed, key), getattr(clean, key), err_msg=key)


# --------------------------------------------------------------------------- (b) LoRA fine-tuning

def tuner():
    from moe2lib.models.finetune import LoraFineTuner, LoraSettings

    settings = LoraSettings(target="letter", rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                            batch_size=1, max_steps=2, lr=1e-3, warmup_ratio=0.0)
    return LoraFineTuner(MODEL, settings, seed=0, n_threads=1, progress=False)


def train_two(root) -> list:
    """Fine-tune experts e0 and e1 (2 short MMLU dev questions each, 2 steps of one) into ``root``."""
    from moe2lib.models.finetune import fit_saved

    qs = short_questions("dev", 4)
    return [fit_saved(tuner(), part, Path(root) / name) for name, part in (("e0", qs[:2]), ("e1", qs[2:]))]


@pytest.mark.slow
def test_finetuning_killed_after_one_expert_reuses_it(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    root = tmp_path / "peft"
    child = _KillWhen("import test_reliability as t; t.train_two(sys.argv[1])", root,
                      condition=lambda: (root / "e0" / "meta.json").exists(), log=tmp_path / "child.log")
    ref = child.beside(train_two, tmp_path / "ref")  # the uninterrupted reference

    assert not (root / "e1").exists()  # the second expert was in training: no folder that looks finished
    assert set(_results(root)) >= {"e0/meta.json", "e0/history.json", "e0/adapter_model.safetensors"}
    weights = root / "e0" / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    e0, e1 = train_two(root)
    assert e0.skipped_ and not hasattr(e0, "model_") and weights.stat().st_mtime_ns == mtime
    assert not e1.skipped_ and (root / "e1" / "meta.json").exists()
    assert not [p for p in root.iterdir() if _is_temporary(Path(p.name))]  # stale temporaries swept

    for name, got, want in zip(("e0", "e1"), (e0, e1), ref):
        a = load_file(str(root / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "ref" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
        assert [h["loss"] for h in got.history_] == [h["loss"] for h in want.history_], name

    # retraining over a finished folder: a kill inside the removal of the old one (weights gone first)
    # must not leave its meta.json behind, or the next run would reuse a folder without weights
    real_rmtree = __import__("shutil").rmtree

    def killed_inside_rmtree(path, ignore_errors=False):
        if Path(path) == root / "e0":
            (Path(path) / "adapter_model.safetensors").unlink()
            raise KeyboardInterrupt("killed while removing the old folder")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("shutil.rmtree", killed_inside_rmtree)
    with pytest.raises(KeyboardInterrupt):
        e1.save(root / "e0")
    assert not (root / "e0" / "meta.json").exists()


# --------------------------------------------------------------------------- (c) a pipeline stage

SMALL_SMOKE = """\
profile: smoke
seed: 0
data_dir: null
n_threads: 1
benchmark: {name: edge-mix, tasks: [arc_easy], cap_expert: 4, cap_eval: 8, fractions: [0.5, 0.2, 0.3]}
base_models: {letter_mmlu: false, workers: 1}   # one process: the kill lands inside an expert's checkpoint
"""


def reproduce_base_models(cfg, out):
    return runner.reproduce(str(cfg), stages=["base_models"], out=Path(out), log=print)


@pytest.mark.slow
def test_stage_killed_mid_way_is_incomplete_and_resumes(tmp_path, monkeypatch):
    """The smoke profile's base_models stage on 8 questions, killed once its first model's scores are saved."""
    # the up-to-date check below must not see edits made meanwhile: it compares the hashes as recorded
    monkeypatch.setattr(runner, "uses_now", lambda meta: meta.get("uses"))
    cfg = tmp_path / "smoke_small.yaml"
    cfg.write_text(SMALL_SMOKE)
    out = tmp_path / "run"
    stage = out / "artifacts" / "base_models"
    part = stage / "scores.npz.partial"
    child = _KillWhen("import test_reliability as t; t.reproduce_base_models(sys.argv[1], sys.argv[2])", cfg, out,
                      condition=lambda: any(stage.glob(".01_base_models.ipynb.*")) and (part / "expert0.npz").exists(),
                      log=tmp_path / "child.log")
    ref = tmp_path / "ref"
    child.beside(reproduce_base_models, cfg, ref)  # the uninterrupted reference

    assert not (stage / "meta.json").exists()  # not complete
    assert _results(stage) == ["scores.npz.partial/expert0.npz", "scores.npz.partial/manifest.json"]

    logs = []
    assert runner.reproduce(str(cfg), stages=["base_models"], out=out, log=logs.append) == {"base_models": "ran"}
    executed = (stage / "01_base_models.ipynb").read_text()
    assert "resuming from the checkpoint" in executed and "8 of 16 scores already done" in executed
    assert not part.exists()
    assert not list(stage.glob(".*.tmp*"))  # the killed run's temporary notebook is cleared

    ref_stage = ref / "artifacts" / "base_models"
    assert _results(stage) == _results(ref_stage)
    a, b = (Scores.load(d / "scores.npz") for d in (stage, ref_stage))
    for key in ("probs", "n_tokens", "answer", "qid", "experts", "n_choices"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert json.loads((stage / "metrics.json").read_text()) == json.loads((ref_stage / "metrics.json").read_text())
    meta, ref_meta = artifacts.read_meta(stage), artifacts.read_meta(ref_stage)
    assert meta["pipeline"]["key"] == ref_meta["pipeline"]["key"] and meta["params"] == ref_meta["params"]
    assert runner.reproduce(str(cfg), stages=["base_models"], out=out, log=logs.append) == {"base_models": "skipped"}


# --------------------------------------------------------------------------- validation: config files

def _stage_errors(tmp_path, text):
    """Load a profile written from ``text`` and check every stage's entry; the InputError raised, if any."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    try:
        cfg, _ = config.load_config(str(path))
        for stage in runner.STAGES.values():
            runner.stage_params(cfg, path, stage, "p", tmp_path)
    except InputError as exc:
        return exc
    return None


@pytest.mark.parametrize("text, line, param, message", [
    ("seed: 0\nexperts:\n  lr: fast\n", 3, "experts.lr", "expected float, got str 'fast'"),
    ("seed: 0\nfusion: {max_tokens: 8, prefix: 1}\n", 2, "fusion.prefix", "expected bool, got int 1"),
    ("seed: 0\nfusion:\n  top_k: 2.5\n", 3, "fusion.top_k", "expected int, got float 2.5"),
    ("seed: 0\nfusion:\n  top_k: true\n", 3, "fusion.top_k", "expected int, got bool True"),
    ("seed: 0\nbase_models:\n  normalisation:\n", 3, "base_models.normalisation", "expected str, got null"),
    ("seed: 0\ngating:\n  hidden: 256\n", 3, "gating.hidden", "expected list, got int 256"),
    ("seed: 0\ngating:\n  hidden:\n    - 256\n    - 12.5\n", 5, "gating.hidden[1]", "items must be int, got float"),
    ("seed: 0\ntables:\n  delay_budgets: [1, null, soon]\n", 3, "tables.delay_budgets[2]",
     "items must be float or null, got str 'soon'"),
    ("seed: 0\nclustering: {umap_points: many}\n", 2, "clustering.umap_points", "expected int"),
    ("seed: 0\nprofile: [smoke]\n", 2, "profile", "wrong type list"),
    ("seed: 0\nn_threads: 2\nseed: 1\n", 3, "seed", "key given twice"),
    ("seed: 0\ngating:\n  lr: 0.1\n  dropout: 0.2\n  lr: 0.2\n", 5, "gating.lr", "key given twice"),
    ("seed: 0\ngating: 3\n", 2, "gating", "a stage's entry is a mapping"),
])
def test_config_type_errors_name_file_line_and_parameter(tmp_path, text, line, param, message):
    err = _stage_errors(tmp_path, text)
    assert err is not None, "accepted"
    assert (err.path, err.line, err.param) == (str(tmp_path / "p.yaml"), line, param), str(err)
    assert message in str(err) and str(err).startswith(f"{tmp_path / 'p.yaml'}:{line}, parameter '{param}'")


@pytest.mark.parametrize("text, line, param, message", [
    ("base_models:\n  models: [smollm2-135m-instruct, gpt-5]\n", 2, "base_models.models[1]",
     "unknown llm model 'gpt-5'; known: gemma3-270m, qwen2.5-3b-instruct-q4, qwen2.5-7b-instruct-q4, "
     "smollm2-135m-instruct"),
    ("gating:\n  embedding_model: gemma3-270m\n", 2, "gating.embedding_model",
     "is registered as a 'llm' model, not 'embedding'"),
    ("clustering:\n  embedding_model: minilm\n", 2, "clustering.embedding_model", "known: all-minilm-l6-v2, mgte-base"),
    ("experts:\n  layout:\n    - [e0, gemma3-270m, 0, rtx4090]\n    - [e1, smollm2-135m-instruct, 1, toaster]\n",
     4, "experts.layout[1][3]", "unknown device 'toaster'; known: cpu-local,"),
    ("experts:\n  layout:\n    - [e0, gemma3-270m, 0, rtx4090]\n    - [e1, gemma-3, 1, rtx4090]\n",
     4, "experts.layout[1][1]", "unknown llm model 'gemma-3'"),
    ("experts:\n  layout:\n    - [e0, gemma3-270m, 0, rtx4090]\n    - [e0, gemma3-270m, 1, rtx4090]\n",
     4, "experts.layout[1][0]", "expert name 'e0' is given twice"),
    ("experts:\n  layout:\n    - [e0, gemma3-270m, 0]\n", 3, "experts.layout[0]",
     "[name, base model, cluster, device]"),
    ("experts:\n  layout:\n    - [e0, gemma3-270m, -1, rtx4090]\n", 3, "experts.layout[0][2]", "non-negative"),
])
def test_unknown_model_device_or_expert_names_are_named(tmp_path, text, line, param, message):
    err = _stage_errors(tmp_path, "seed: 0\n" + text)
    assert err is not None, "accepted"
    assert (err.line, err.param) == (line + 1, param), str(err)
    assert message in str(err) and f"p.yaml:{line + 1}" in str(err)


def test_config_values_the_types_allow_are_accepted(tmp_path, monkeypatch):
    """int for float, null where the default is None, anything where the default is None, a model file path."""
    model_file = tmp_path / "my.gguf"
    model_file.write_bytes(b"GGUF")
    text = textwrap.dedent(f"""\
        seed: 0
        experts: {{lr: 1, layout: [[e0, {model_file}, 0, cpu-local]]}}
        profiles: {{power_watts: 35, modes: [measured]}}
        tables: {{delay_budgets: [1, 2.5, null], energy_budgets: [5, 10]}}
        gating: {{hidden: [64], embedding_model: all-minilm-l6-v2}}
        """)
    assert _stage_errors(tmp_path, text) is None
    cfg, path = config.load_config(str(tmp_path / "p.yaml"))
    params = runner.stage_params(cfg, path, runner.STAGES["tables"], "p", tmp_path)
    assert params["delay_budgets"] == [1, 2.5, None]


def test_type_rules_follow_the_notebook_default():
    check = runner.type_mismatch
    assert check(3, 1.0) is None and check(True, False) is None and check("x", None) is None
    assert check([1], None) is None and check({"a": 1}, {}) is None
    assert "expected float" in check("3", 1.0) and "expected int" in check(1.0, 1)
    assert "expected int" in check(False, 1) and "expected bool" in check(0, True)
    assert "expected dict" in check([], {}) and "expected str" in check(None, "a")


def test_yaml_line_finds_nested_keys_and_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb:\n  c: [1,\n    2]\n  d:\n    - x\n    - y\n")
    assert config.yaml_line(path, "a") == 1 and config.yaml_line(path, "b", "c") == 3
    assert config.yaml_line(path, "b", "c", 1) == 4 and config.yaml_line(path, "b", "d", 1) == 7
    assert config.yaml_line(path, "b", "nope") == 2 and config.yaml_line(tmp_path / "missing.yaml", "a") is None


# --------------------------------------------------------------------------- validation: data files

def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    (folder / "toy_test.csv").write_bytes(b"q1,a,b,c,d,A\nq2,a,b,c,d,B\n\"q3\nstill q3 \xff\",a,b,c,d,C\n")
    with pytest.raises(InputError, match="not UTF-8") as err:
        loaders.load_mmlu("test", tmp_path)
    assert err.value.line == 4 and "toy_test.csv:4" in str(err.value)
    bad = tmp_path / "set.jsonl"
    bad.write_bytes(b'{"query": "ok", "choices": ["x", "y"], "gold": 1}\n\n{"query": "\xe9t\xe9"}\n')
    with pytest.raises(InputError, match="not UTF-8") as err:
        loaders.load_jsonl(bad)
    assert "set.jsonl:3" in str(err.value)


# --------------------------------------------------------------------------- validation: score artifacts

def _scores_file(tmp_path, **over):
    arrays = dict(probs=np.full((3, 2, 4), 0.25, np.float32), answer=np.array([0, 1, 2]),
                  subject=np.array(["a", "a", "b"]), qid=np.array(["t.csv:1", "t.csv:2", "t.csv:3"]),
                  n_tokens=np.ones((3, 2), np.int32), experts=np.array(["x", "y"]))
    arrays.update(over)
    path = tmp_path / "scores_mmlu.npz"
    artifacts.write_npz(path, **arrays)
    return path


@pytest.mark.parametrize("over, param, message", [
    (dict(answer=np.array([0.0, 1.0, 2.0])), "answer", "answer must hold integers, got dtype float64"),
    (dict(probs=np.full((3, 2, 4), "0.25")), "probs", "probs must hold numbers"),
    (dict(n_tokens=np.array([[1, 2], [3, -4], [5, 6]])), "n_tokens", r"n_tokens[1, 1] is negative"),
    (dict(qid=np.array(["t.csv:1", "t.csv:2", "t.csv:1"])), "qid", "'t.csv:1' appears 2 times"),
    (dict(experts=np.array(["x", "x"])), "experts", "'x' appears 2 times"),
    (dict(n_tokens=np.ones((3, 3), np.int32)), "n_tokens", "n_tokens has shape (3, 3), expected (3, 2)"),
    (dict(probs=np.full((3, 2), 0.5)), "probs", "probs must be (N, K, C)"),
    (dict(probs=np.full((3, 2, 4), 0.3, np.float32)), "probs", "probs[0, 0] sums to 1.2"),
])
def test_bad_score_files_name_file_and_array(tmp_path, over, param, message):
    path = _scores_file(tmp_path, **over)
    with pytest.raises(InputError) as err:
        Scores.load(path)
    assert err.value.path == str(path) and err.value.param == param
    assert message in str(err.value) and str(err.value).startswith(f"{path}, parameter '{param}'")
    assert Scores.load(_scores_file(tmp_path))  # the same file without the fault loads


def test_saving_refuses_repeated_qids(tmp_path):
    s = Scores.load(_scores_file(tmp_path))
    with pytest.raises(InputError, match="qid must be distinct"):
        s.subset([0, 1, 1]).save(tmp_path / "twice.npz")
    assert not (tmp_path / "twice.npz").exists()
