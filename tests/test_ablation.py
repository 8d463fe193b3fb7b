"""The ablation of how experts are made, on the smoke profile: real fine-tuning and scoring on validation
questions only, one table row per setting, resumable."""

import json

import numpy as np
import pytest
from conftest import needs_data

from moe2lib.errors import InputError
from moe2lib.pipeline import ablation
from moe2lib.pipeline.config import CONFIGS

ROWS = """rows:
  - {name: "as configured"}
  - {name: "rank 4", rank: 4, alpha: 8}
"""


def test_rows_are_checked(tmp_path):
    bad = tmp_path / "rows.yaml"
    bad.write_text("rows:\n  - {name: a}\n  - {name: b, learning_rate: 1}\n")
    with pytest.raises(InputError, match="learning_rate") as err:
        ablation.load_rows(bad)
    assert err.value.line == 3 and err.value.path is not None
    bad.write_text("rows:\n  - {name: A b}\n  - {name: a-B}\n")
    with pytest.raises(InputError, match="differ"):
        ablation.load_rows(bad)
    bad.write_text("rows: []\n")
    with pytest.raises(InputError, match="non-empty"):
        ablation.load_rows(bad)
    assert [r.slug for r in ablation.load_rows(CONFIGS / "ablation.yaml")][:2] == [
        "embedding-clusters", "task-clusters"]


@pytest.mark.slow
@needs_data
def test_smoke_ablation_measures_each_row_on_validation_and_resumes(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(ROWS)
    out = tmp_path / "ablation"
    first = ablation.run("smoke", rows, out, log=lambda *a: None)
    assert [r["row"] for r in first] == ["as configured", "rank 4"]
    for r in first:
        assert r["n_validation"] > 0 and not r["reused"]
        for k in ("own_gain", "own_minus_other", "moe2_minus_sa", "router_minus_sa"):
            assert np.isfinite(r[k]) and -1 <= r[k] <= 1, (k, r[k])
    table = (out / "table.csv").read_text().splitlines()
    assert table[0].startswith("row,own_gain") and len(table) == 3
    assert json.loads((out / "ablation.json").read_text())["rows"][1]["changes"] == {"rank": 4, "alpha": 8}
    again = ablation.run("smoke", rows, out, only=["rank 4"], log=lambda *a: None)
    assert again[0]["reused"] and again[0]["own_gain"] == first[1]["own_gain"]  # adapters and scores reused
    kept = json.loads((out / "ablation.json").read_text())["rows"]   # the row not rerun stays, in file order
    assert [r["row"] for r in kept] == ["as configured", "rank 4"] and kept[0] == first[0]
    assert all(r["git_commit"] for r in kept) and len((out / "table.csv").read_text().splitlines()) == 3


def test_base_is_checked_and_rows_measured_at_another_base_are_not_kept(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text("base: {epochs: 1, lr: 0.001}\n" + ROWS)
    assert ablation.load_base(rows) == {"epochs": 1, "lr": 0.001}
    assert ablation.load_base(CONFIGS / "ablation.yaml") == {"n_clusters": 8, "epochs": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("# the base\nbase: {epoch: 2}\n" + ROWS)
    with pytest.raises(InputError, match="epoch") as err:
        ablation.load_base(bad)
    assert err.value.line == 2
    listed = ablation.load_rows(rows)
    measured = [{"row": r.name, "changes": r.changes, "own_gain": 0.1, "own_minus_other": 0.05,
                 "moe2_minus_sa": 0.02, "router_minus_sa": 0.01, "train_s_per_expert": 9.0, "n_validation": 30}
                for r in listed]
    ablation.write_results(tmp_path, "smoke", measured, {"epochs": 1, "lr": 0.001})
    assert list(ablation.earlier_rows(tmp_path, "smoke", listed, {"epochs": 1, "lr": 0.001})) == [
        "as configured", "rank 4"]
    assert ablation.earlier_rows(tmp_path, "smoke", listed, {"epochs": 2}) == {}   # another base: measured again
    assert ablation.earlier_rows(tmp_path, "default", listed, {"epochs": 1, "lr": 0.001}) == {}
    assert list(ablation.earlier_rows(tmp_path, "smoke", [listed[1]], {"epochs": 1, "lr": 0.001})) == ["rank 4"]
