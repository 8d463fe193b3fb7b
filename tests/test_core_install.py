"""The core (gating loss, fusion, SMO, the cost model, evaluation, the coordinator's planning) runs with only
pyproject.toml's core dependencies: every heavy package (torch, llama.cpp, scikit-learn, matplotlib,
servers...) is blocked in a fresh interpreter, which then computes known answers. Undeclared core imports fail
here, not for a user."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import importlib.abc, math, sys
ALLOWED = set(sys.argv[1].split(","))
HEAVY = {"torch", "transformers", "peft", "accelerate", "llama_cpp", "sentence_transformers", "sklearn", "umap",
         "matplotlib", "pandas", "papermill", "jupyterlab", "ipykernel", "fastapi", "starlette", "uvicorn", "zeus"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY - ALLOWED:
            raise ImportError(f"blocked (not a core dependency): {name}")
sys.meta_path.insert(0, Block())
import numpy as np
from moe2lib.analysis import evaluation
from moe2lib.core import costmodel, devices, fusion, gating, smo
from moe2lib.serve import coordinator

rng = np.random.default_rng(0)
K, N = 6, 40
gate = rng.dirichlet(np.ones(K), N)
probs = rng.dirichlet(np.ones(4), (N, K))
answer = rng.integers(0, 4, N)
loss = lambda masks: gating.subset_loss(gate, probs, answer, masks)
full = loss(np.ones((1, K), bool))[0]
assert abs(full + np.log(gating.fuse(gate, probs)[np.arange(N), answer]).mean()) < 1e-9
delay, energy = rng.uniform(0.1, 1, K), rng.uniform(1, 5, K)
got = smo.select_subset(loss, delay, energy, 0.8, 8.0)
ref = smo.exhaustive_subset(loss, delay, energy, 0.8, 8.0)
assert np.array_equal(got.mask, ref.mask) and abs(got.loss - ref.loss) < 1e-12
w = gating.subset_weights([0.5, 0.3, 0.2], [True, False, True])
assert np.allclose(w, [0.5 / 0.7, 0, 0.2 / 0.7])
assert fusion.fuse_text(w[[0, 2]], [{"a": 0.9, "b": 0.1}, {"b": 1.0}]).argmax() == "a"
cost = costmodel.ModelCost("m", params=1e8, weight_bytes=2e8, n_layer=12, attn_width=768, source="test")
model = costmodel.RooflineModel.from_device(cost, devices.get("rtx4090"))
assert model.prefill(64) > 0 and model.decode(64) > 0
assert evaluation.majority_vote(np.eye(4)[[[2, 2, 1]]]).tolist() == [2]
clients = [coordinator.ExpertClient(f"http://127.0.0.1:{p}", n) for n, p in [("a", 1), ("b", 2)]]
coord = coordinator.Coordinator(clients, costs={"a": coordinator.ExpertCost(0.1), "b": coordinator.ExpertCost(1.0)},
                                deadline_s=5)
assert coord.plan([{"role": "user", "content": "Hi"}], 8)[1].tolist() == [True, False]  # no server framework needed
print("core ok", round(float(full), 6), np.flatnonzero(got.mask).tolist())
'''


def test_core_runs_with_only_its_declared_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("-", "_") for d in deps}
    assert {"numpy", "scipy", "threadpoolctl"} <= names
    out = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(sorted(names))], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("core ok")


def test_the_blocker_catches_an_undeclared_heavy_import():
    planted = SCRIPT.replace("import numpy as np\n", "import numpy as np\nimport torch\n", 1)
    out = subprocess.run([sys.executable, "-c", planted, "numpy"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "blocked (not a core dependency): torch" in out.stderr
