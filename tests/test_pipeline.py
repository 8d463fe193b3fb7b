import json
import os
import subprocess
import sys

import pytest

from moe2lib.data.loaders import resolve_data_dir
from moe2lib.errors import InputError
from moe2lib.infra import artifacts
from moe2lib.pipeline import config, runner


def _cfg(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_profiles_load_and_match_their_notebooks():
    for profile in config.PROFILES:
        cfg, path = config.load_config(profile)
        for stage in runner.STAGES.values():
            params = runner.stage_params(cfg, path, stage, profile, runner.out_root(profile))
            assert params["profile"] == profile and params["seed"] == cfg["seed"]


def test_the_benchmark_is_written_once_in_the_profile(tmp_path):
    """No notebook repeats the task list: its benchmark parameter is None, the pipeline passes the profile's,
    and a notebook opened by hand reads its profile's (the default profile's where a profile names none)."""
    users = [s for s in runner.STAGES.values() if "benchmark" in runner.notebook_parameters(s)]
    assert [s.name for s in users] == ["base_models", "clustering", "experts", "scoring", "gating"]
    assert all(runner.notebook_parameters(s)["benchmark"] is None for s in users)
    for profile in config.PROFILES:
        cfg, path = config.load_config(profile)
        assert config.profile_benchmark(profile) == cfg["benchmark"]
        assert all(runner.stage_params(cfg, path, s, profile, tmp_path)["benchmark"] == cfg["benchmark"] for s in users)
    bare = _cfg(tmp_path, "seed: 0\n")
    cfg, _ = config.load_config(str(bare))
    default = config.profile_benchmark("default")
    assert config.profile_benchmark(str(bare)) == default
    assert runner.stage_params(cfg, bare, users[0], "p", tmp_path)["benchmark"] == default


@pytest.mark.parametrize("text, message", [
    ("seed: 0\nsede: 1\n", r"p\.yaml:2, parameter 'sede': unknown key"),
    ("seed: zero\n", r"p\.yaml:1, parameter 'seed': seed has the wrong type str"),
    ("seed: 0\nbase_models:\n  n_question: 3\n", r"p\.yaml:3, parameter 'base_models.n_question'.*has no parameter"),
    ("seed: 0\nprofiles:\n  n_questions: many\n", r"p\.yaml:3, parameter 'profiles.n_questions': expected int, got str"),
    ("seed: 0\nbase_models: [1\n", r"p\.yaml:\d+: invalid YAML"),
])
def test_bad_profiles_name_file_and_key(tmp_path, text, message):
    path = _cfg(tmp_path, text)
    with pytest.raises(InputError, match=message):
        cfg, _ = config.load_config(str(path))
        for stage in runner.STAGES.values():
            runner.stage_params(cfg, path, stage, "p", tmp_path)


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "moe2lib", "--help"], capture_output=True, text=True, check=True)
    for command in ("reproduce", "stages", "models", "data", "score"):
        assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", "moe2lib", "reproduce", "--profile", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "smoke" in bad.stderr


@pytest.mark.slow  # the smoke pipeline: every notebook, real models
def test_smoke_pipeline_runs_then_skips(smoke_run):
    tmp_path, outcome, logs = smoke_run
    assert set(outcome.values()) == {"ran"}
    meta = artifacts.read_meta(tmp_path / "artifacts" / "base_models")
    assert meta["pipeline"]["profile"] == "smoke" and meta["params"]["benchmark"]["cap_eval"] == 12
    assert meta["git_commit"] is None or len(meta["git_commit"]) >= 40
    metrics = json.loads((tmp_path / "artifacts" / "base_models" / "metrics.json").read_text())
    assert metrics["n_questions"] == 48 and set(metrics["accuracy"]) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert set(metrics["per_task"]) == {"mmlu", "arc_easy", "winogrande", "boolq"}
    assert set(metrics["mmlu_letter_vs_choice"]["gemma3-270m"]) == {"letter", "choice"}
    for fig in ("base_models_task_accuracy.png", "base_models_letter_bias.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 10_000
    art = tmp_path / "artifacts"
    experts = json.loads((art / "experts" / "experts.json").read_text())
    assert [e["name"] for e in experts] == ["expert0", "expert3"] and all(e["adapter"] for e in experts)
    profiles = json.loads((art / "profiles" / "profiles.json").read_text())
    assert set(profiles["modes"]) == {"measured", "paper-testbed"}
    gating = json.loads((art / "gating" / "metrics.json").read_text())
    assert set(gating["accuracy"]) >= {"single_agent", "average_expert", "majority_voting", "best_expert",
                                       "router_top1", "moe2", "moe2_topk", "oracle"}
    assert all(0 <= v <= 1 for v in gating["accuracy"].values())
    assert gating["n_test"] + gating["n_train"] == 48 and "moe2-single_agent" in gating["differences"]
    assert len(list((art / "tables").glob("*.csv"))) == 6 and (art / "tables" / "tables.md").exists()
    assert (art / "fusion" / "trace.json").exists()
    for stage in runner.STAGES:
        assert artifacts.read_meta(art / stage)["pipeline"]["profile"] == "smoke"
    again = runner.reproduce("smoke", out=tmp_path, log=logs.append)
    assert set(again.values()) == {"skipped"}


def test_unparsable_parameter_line_is_an_error(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("seed = 0   # fine\nrank = 8   # scale alpha / r = 2\n",
                                          metadata={"tags": ["parameters"]})]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(InputError, match=r"nb\.ipynb.*'rank'.*line 2 "):
        runner.notebook_parameters(runner.Stage("x", str(path)))
    nb.cells[0].source = "seed = 0   # fine\nrank = 8   # alpha over r is 2\n"
    nbformat.write(nb, path)
    assert runner.notebook_parameters(runner.Stage("x", str(path))) == {"seed": 0, "rank": 8}


def _deterministic(value):
    """A metrics tree without what is measured or stamped (timings, throughput, commit, date)."""
    if isinstance(value, dict):
        return {k: _deterministic(v) for k, v in value.items()
                if not (k.endswith("_s") or "time" in k or k in ("git_commit", "created"))}
    if isinstance(value, list):
        return [_deterministic(v) for v in value]
    return value


@pytest.mark.slow  # a second smoke run
def test_same_seed_gives_identical_metrics(smoke_run, tmp_path):
    """Two smoke runs with one seed: every metric that is not a timing is identical, bit for bit.

    The tables of this machine's measured profile are left out: their budgets bind on measured delays,
    which vary between runs; the emulated paper-testbed tables depend on the catalogue only.
    """
    first = smoke_run[0] / "artifacts"
    runner.reproduce("smoke", out=tmp_path, stages=[s for s in runner.STAGES if s != "fusion"], log=print)
    second = tmp_path / "artifacts"
    for stage in ("base_models", "clustering", "experts", "scoring", "gating"):
        a, b = (json.loads((d / stage / "metrics.json").read_text()) for d in (first, second))
        assert _deterministic(a) == _deterministic(b), stage
    for name in sorted(p.name for p in first.glob("tables/paper-testbed_*.csv")):
        assert (first / "tables" / name).read_text() == (second / "tables" / name).read_text(), name
    import numpy as np
    for rel in ("scoring/scores.npz", "gating/gate.npz"):
        with np.load(first / rel) as a, np.load(second / rel) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{rel}:{key}")


@pytest.mark.slow  # needs the smoke run
def test_evaluate_resplits_a_finished_run_without_models(smoke_run):
    """`evaluate --seed S` retrains the gating on a new split from the run's artifacts and prints Fig. 3 as JSON."""
    root = smoke_run[0]
    out = subprocess.run([sys.executable, "-m", "moe2lib", "evaluate", "--bench", "edge-mix", "--seed", "7",
                          "--profile", "smoke", "--out", str(root), "--n-bootstrap", "100"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    gating = json.loads((root / "artifacts" / "gating" / "metrics.json").read_text())
    assert result["n_test"] == gating["n_test"] and result["seed"] == 7
    assert set(result["accuracy"]) == set(gating["accuracy"])
    lo, hi = result["differences"]["moe2-single_agent"]["ci95"]
    assert lo <= result["differences"]["moe2-single_agent"]["difference"] <= hi
    again = subprocess.run([sys.executable, "-m", "moe2lib", "evaluate", "--seed", "7", "--profile", "smoke",
                            "--out", str(root), "--n-bootstrap", "100"], capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == result  # seeded: the same split, gating and intervals
    wrong = subprocess.run([sys.executable, "-m", "moe2lib", "evaluate", "--bench", "mmlu", "--seed", "1",
                            "--profile", "smoke", "--out", str(root)], capture_output=True, text=True)
    assert wrong.returncode == 2 and "edge-mix" in wrong.stderr


PROBE_PARAMETERS = '''\
seed = 0                          # unused; a shared profile key
data_file = "questions.jsonl"     # JSONL questions the stage reads
artifacts_dir = "../artifacts"    # where the stage writes
figures_dir = "../figures"        # unused
'''
PROBE_CODE = '''\
from moe2lib.core import smo
from moe2lib.data import loaders
from moe2lib.pipeline import stages
stages.STAGES["probe"] = stages.Stage("probe", "probe.ipynb")
run = stages.StageRun("probe", globals())
print(len(loaders.load_jsonl(data_file)), smo.__name__)
run.finish()
'''
PROBE_DRIVER = '''\
import json
from pathlib import Path

from moe2lib.pipeline import runner

runner.STAGES["probe"] = runner.Stage("probe", "probe.ipynb")
outcomes = []


def reproduce():
    outcomes.append(runner.reproduce("probe.yaml", stages=["probe"], out=Path("run").resolve(), log=print)["probe"])


def append(path, text):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


reproduce()
append("moe2lib/serve/coordinator.py", "# an edit of a module the stage never imported\\n")
reproduce()
append("moe2lib/core/smo.py", "# an edit of a module the stage imported\\n")
reproduce()
append("questions.jsonl", '{"query": "2 + 2 =", "choices": ["4", "5"], "gold": 0}\\n')
reproduce()
reproduce()
print(json.dumps(outcomes))
'''


@pytest.mark.slow
def test_stage_key_follows_the_modules_and_data_the_stage_used(tmp_path):
    """A copy of the library runs a one-cell stage that imports smo and reads a data file: editing
    coordinator.py (never imported) leaves it up to date; editing smo.py or the data file reruns it.
    The stage does not import pipeline.py (only stages.py), so editing how stages are run reruns none."""
    import shutil

    import nbformat

    repo = tmp_path / "repo"
    shutil.copytree(artifacts.REPO_ROOT / "moe2lib", repo / "moe2lib", ignore=shutil.ignore_patterns("__pycache__"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PROBE_PARAMETERS, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(PROBE_CODE)]
    (repo / "notebooks").mkdir()
    nbformat.write(nb, repo / "notebooks" / "probe.ipynb")
    questions = repo / "questions.jsonl"
    questions.write_text('{"query": "1 + 1 =", "choices": ["2", "3"], "gold": 0}\n')
    (repo / "probe.yaml").write_text(f"seed: 0\nprobe:\n  data_file: {questions}\n")
    (repo / "driver.py").write_text(PROBE_DRIVER)
    # the copy has no ../shared beside it: point it at the data this checkout uses, so reproduce does not fetch
    env = {**os.environ, "PYTHONPATH": str(repo), "MOE2_DATA_DIR": str(resolve_data_dir(None, "mmlu/test"))}
    done = subprocess.run([sys.executable, "driver.py"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ran", "skipped", "ran", "ran", "skipped"]
    meta = artifacts.read_meta(repo / "run" / "artifacts" / "probe")
    assert meta["params"] == {"seed": 0, "data_file": str(questions)}
    library = meta["uses"]["library"]
    assert {"moe2lib/core/smo.py", "moe2lib/data/loaders.py", "moe2lib/pipeline/stages.py"} <= set(library)
    assert not {"moe2lib/serve/coordinator.py", "moe2lib/core/fusion.py", "moe2lib/pipeline/runner.py"} & set(library)
    assert library["moe2lib/core/smo.py"] == artifacts.file_sha256(repo / "moe2lib" / "core" / "smo.py")
    assert meta["uses"]["data"] == {"questions.jsonl": artifacts.file_sha256(questions)}  # inside that repo
    parts = {"params": meta["params"], "notebook": meta["pipeline"]["notebook_sha256"], **meta["uses"],
             "upstream": meta["pipeline"]["upstream"]}
    assert artifacts.digest(parts) == meta["pipeline"]["key"]  # the key is readable from meta.json alone


def test_workers_report_the_modules_they_imported(tmp_path):
    """A module imported only inside a worker process is in the stage's record of the library it used."""
    code = ("import sys; from moe2lib.infra import parallel; from moe2lib.pipeline import stages; "
            "parallel.run(exec, [('import moe2lib.models.energy',), ('pass',)], workers=2); "
            "print('moe2lib.models.energy' in sys.modules, 'moe2lib.models.energy' in parallel.worker_modules(), "
            "'moe2lib/models/energy.py' in stages.recorded_uses()['library'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(artifacts.REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True", "True"]
