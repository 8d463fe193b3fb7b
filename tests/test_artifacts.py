import json

import numpy as np
import pytest

from moe2lib.errors import InputError
from moe2lib.infra import artifacts


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    artifacts.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_npz_round_trip_and_no_pickle(tmp_path):
    path = tmp_path / "a.npz"
    artifacts.write_npz(path, probs=np.eye(3, dtype=np.float32), names=np.array(["a", "bb", "ccc"]))
    back = artifacts.read_npz(path)
    assert back["names"].tolist() == ["a", "bb", "ccc"]
    np.testing.assert_array_equal(back["probs"], np.eye(3))
    with pytest.raises(InputError, match="bad"):
        artifacts.write_npz(tmp_path / "b.npz", bad=np.array([{"x": 1}], dtype=object))
    assert not (tmp_path / "b.npz").exists()


def test_meta_records_provenance(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("hello")
    meta = artifacts.write_meta(tmp_path / "stage", params={"seed": 3, "n": 5}, inputs=[inp], wall_time_s=1.23456)
    assert meta == artifacts.read_meta(tmp_path / "stage")
    assert meta["seed"] == 3 and meta["wall_time_s"] == 1.235
    assert meta["inputs"][str(inp)] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert set(meta) >= {"git_commit", "versions", "machine", "written_at", "params"}
    assert meta["versions"]["numpy"] == np.__version__


def test_digest_is_order_independent_for_dicts_and_sensitive_to_values():
    assert artifacts.digest({"a": 1, "b": [1, 2]}) == artifacts.digest({"b": [1, 2], "a": 1})
    assert artifacts.digest({"a": 1}) != artifacts.digest({"a": 2})


def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(InputError, match=r"bad\.json:3"):
        artifacts.read_json(bad)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = artifacts.write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_recorded_paths_are_relative_to_the_repo_or_the_shared_data_beside_it(tmp_path):
    inside = artifacts.REPO_ROOT / "configs" / "default.yaml"
    assert artifacts.portable_path(inside) == "configs/default.yaml"
    shared = artifacts.REPO_ROOT.parent / "shared" / "datasets" / "x.csv"
    assert artifacts.portable_path(shared) == "../shared/datasets/x.csv"
    elsewhere = tmp_path / "data.csv"
    elsewhere.write_text("a\n")
    assert artifacts.portable_path(elsewhere) == str(elsewhere.resolve())
    assert artifacts.input_hashes([inside, elsewhere]) == {
        "configs/default.yaml": artifacts.file_sha256(inside), str(elsewhere.resolve()): artifacts.file_sha256(elsewhere)}


def test_git_commit_is_dirty_for_code_changes_not_for_the_pipelines_outputs(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("code.py", "artifacts/x/metrics.json", "figures/f.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = artifacts.git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "artifacts/x/metrics.json").write_text("2")
    (tmp_path / "figures/f.png").write_text("2")
    assert artifacts.git_commit(tmp_path) == clean   # a run rewriting its outputs is still this commit
    (tmp_path / "code.py").write_text("2")
    assert artifacts.git_commit(tmp_path) == clean + "-dirty"
