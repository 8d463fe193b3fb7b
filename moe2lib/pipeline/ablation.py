"""Why are the experts weak? One change at a time to how they are made, measured on validation questions.

Each row of an ablation changes one setting of the clustering or experts stage from a shared base
(``configs/ablation.yaml``): how prompts are clustered, examples per expert, epochs, LoRA rank, learning
rate, target modules, the training target. For each row the experts are trained on the benchmark's
expert-training questions minus the validation share (the clustering stage's ``validation_fraction``),
then scored, with their base models, on the validation questions only. Reported per row:

* ``own_gain``: an expert's accuracy minus its base model's on the validation questions of its own cluster,
  averaged over the experts (the scoring stage's ``mean_own_cluster_gain``, on validation);
* ``own_minus_other``: that gain minus the same gain on the other clusters' questions (specialisation);
* ``moe2_minus_sa``: MoE2 (the gating network, trained by 5-fold cross-fitting on validation) minus the
  Single Agent, the better base model, in points; ``router_minus_sa`` the same for the top-1 router;
* ``train_s_per_expert``: mean training wall time per expert.

Nothing here reads a gating-training or test question, so a default chosen from this table is chosen on
validation only. Every row's adapters and scores sit under ``<out>/rows/<row>/`` and are reused when the
row's settings are unchanged, so an interrupted ablation resumes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..analysis import evaluation
from ..core.scores import Scores, own_cluster_accuracy, own_minus_other_gain
from ..data import tasks
from ..errors import InputError
from ..infra import artifacts
from ..models import clustering, experts, finetune, lora, registry, scoring
from . import runner
from .config import load_config, yaml_line
from .stages import notebook_parameters

# what a row may change, and which stage's parameter it is
KNOBS = {"cluster_by": "clustering", "n_clusters": "clustering", "max_examples_per_expert": "experts",
         "epochs": "experts", "rank": "experts", "alpha": "experts", "lr": "experts", "target_modules": "experts",
         "target": "experts", "lora_layers": "experts", "batch_size": "experts", "grad_accum": "experts"}
LORA_KEYS = ("target", "rank", "alpha", "dropout", "target_modules", "cutoff_len", "epochs", "batch_size",
             "grad_accum", "lr", "weight_decay", "max_grad_norm", "warmup_ratio")
COLUMNS = ("row", "own_gain", "own_minus_other", "moe2_minus_sa", "router_minus_sa", "train_s_per_expert",
           "n_validation")


@dataclass
class Row:
    """One line of the ablation: a name and the settings it changes from the base."""

    name: str
    changes: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def _read(path: Path):
    """The parsed ablation file; an unreadable file or bad YAML is an InputError naming it."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the ablation file: {exc}", path=path) from None


def load_rows(path) -> list[Row]:
    """The rows of an ablation file (``rows: [{name: ..., <knob>: value, ...}, ...]``), checked."""
    path = Path(path)
    doc = _read(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not doc["rows"]:
        raise InputError("an ablation file holds a non-empty list 'rows'", path=path, param="rows")
    rows = []
    for i, r in enumerate(doc["rows"]):
        line = yaml_line(path, "rows", i)
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise InputError("each row is a mapping with a 'name'", path=path, line=line, param=f"rows[{i}]")
        unknown = sorted(set(r) - {"name"} - set(KNOBS))
        if unknown:
            raise InputError(f"row {r['name']!r} changes unknown settings {unknown}; known: {', '.join(KNOBS)}",
                             path=path, line=line, param=f"rows[{i}]")
        rows.append(Row(r["name"], {k: v for k, v in r.items() if k != "name"}))
    if len({r.slug for r in rows}) != len(rows):
        raise InputError("row names must differ (after lower-casing and dropping punctuation)", path=path,
                         param="rows")
    return rows


def load_base(path) -> dict:
    """The ablation file's ``base``: knob values every row starts from, on top of the profile's, so the rows
    keep their meaning when the profile's defaults change (empty when the file has none)."""
    path = Path(path)
    doc = _read(path)
    base = (doc.get("base") if isinstance(doc, dict) else None) or {}
    if not isinstance(base, dict):
        raise InputError("'base' is a mapping of knobs to values", path=path, line=yaml_line(path, "base"),
                         param="base")
    unknown = sorted(set(base) - set(KNOBS))
    if unknown:
        raise InputError(f"base changes unknown settings {unknown}; known: {', '.join(KNOBS)}", path=path,
                         line=yaml_line(path, "base"), param="base")
    return base


def _settings(profile: str) -> dict[str, dict]:
    """The clustering, experts, scoring and gating stages' parameters for ``profile`` (notebook defaults +
    the profile's values), as the pipeline would run them."""
    cfg, cfg_path = load_config(profile)
    root = runner.out_root(cfg.get("profile", Path(profile).stem))
    return {name: {**notebook_parameters(runner.STAGES[name]),
                   **runner.stage_params(cfg, cfg_path, runner.STAGES[name], cfg.get("profile", profile), root)}
            for name in ("clustering", "experts", "scoring", "gating")}


def own_other_gain(scores: Scores, base: Scores, clusters, expert_cluster) -> tuple[float, float]:
    """(mean own-cluster gain, mean own-minus-other gain) of the experts over their base models' columns."""
    own_e, _ = own_cluster_accuracy(scores, clusters, expert_cluster)
    own_b, _ = own_cluster_accuracy(base, clusters, expert_cluster)
    return (float(np.nanmean(own_e - own_b)),
            float(np.nanmean(own_minus_other_gain(scores, base, clusters, expert_cluster))))


def cross_fitted_gain(X, E: Scores, B: Scores, make_network, *, folds: int = 5, seed: int = 0,
                      top_k: int = 2) -> dict:
    """MoE2 and the top-1 router minus the Single Agent on ``E``'s rows, each row predicted by a gating
    network (and temperatures, best base model) fitted on the other folds: what the pipeline measures on
    test, measured on validation alone."""
    order = np.random.default_rng(seed).permutation(E.n)
    right = {"moe2": np.zeros(E.n), "router_top1": np.zeros(E.n), "single_agent": np.zeros(E.n)}
    for f in range(folds):
        test = np.sort(order[f::folds])
        train = np.setdiff1d(np.arange(E.n), test)
        correct = evaluation.fig3_experiment(X, E, B, train, test, make_network, top_k=top_k, n_bootstrap=10,
                                             seed=seed)["correct"]
        for k in right:
            right[k][test] = correct[k]
    diff = {k: float(right[k].mean() - right["single_agent"].mean()) for k in ("moe2", "router_top1")}
    return diff


def run_row(row: Row, settings: dict, out: Path, *, workers: int = 2, n_threads: int = 2, log=print) -> dict:
    """Train the row's experts, score them and their base models on validation, and measure (see module)."""
    cl = {**settings["clustering"], **{k: v for k, v in row.changes.items() if KNOBS[k] == "clustering"}}
    ex = {**settings["experts"], **{k: v for k, v in row.changes.items() if KNOBS[k] == "experts"}}
    bench = tasks.build_benchmark(seed=cl["seed"], data_dir=cl["data_dir"], **cl["benchmark"])
    train, val = tasks.validation_split(bench.where("expert"), cl["validation_fraction"], cl["seed"])
    if not val:
        raise InputError("the profile holds out no validation questions", param="clustering.validation_fraction")
    opts = dict(model=cl["embedding_model"], max_seq_length=cl["embedding_max_tokens"])
    X_train = clustering.embed_texts([it.text for it in train], progress=False, **opts)
    X_val = clustering.embed_texts([it.text for it in val], progress=False, **opts)
    km = clustering.make_clusters(cl["cluster_by"], cl["n_clusters"], seed=cl["seed"], n_init=cl["n_init"])
    km.fit(X_train, [it.task for it in train])
    dist = km.transform(X_train)
    val_cluster = km.assign(X_val, [it.task for it in val])
    hyper = finetune.LoraSettings(**{k: ex[k] for k in LORA_KEYS}, max_steps=ex["max_steps"] or None,
                                  layers=ex["lora_layers"])
    here = out / "rows" / row.slug
    jobs, specs = [], []
    for name, base, cluster, device in ex["layout"]:
        idx, _ = finetune.select_examples(km.labels_, dist, cluster, ex["max_examples_per_expert"],
                                          ex["min_examples_per_expert"], ex["seed"])
        tuner = finetune.LoraFineTuner(base, hyper, seed=ex["seed"], n_threads=max(1, n_threads // workers),
                                       progress=False)
        jobs.append((tuner, [train[i] for i in idx], here / "peft" / name))
    t0 = time.time()
    fitted = finetune.fit_all(jobs, workers)
    log(f"[{row.name}] trained {len(fitted)} experts in {time.time() - t0:.0f} s")
    for (name, base, cluster, device), ft in zip(ex["layout"], fitted):
        gguf = lora.export_gguf(ft.adapter_dir_, registry.locate(base, "llm"), here / "adapters" / f"{name}.gguf")
        specs.append(experts.ExpertSpec(name, base, str(gguf), "llama_cpp", cluster, device))
    threads, norm = max(1, n_threads // workers), settings["scoring"]["normalisation"]
    reused = all(ft.skipped_ for ft in fitted)
    E = _scored(val, here / "validation_scores.npz", [s.name for s in specs], reused,
                lambda: [s.build(n_threads=threads, weights="merged") for s in specs], norm, workers)
    bases = sorted({s.model for s in specs})
    B_all = _scored(val, out / "validation_base.npz", [registry.display_name(m) for m in bases], True,
                    lambda: [experts.make_expert(m, n_threads=threads) for m in bases], norm, workers)
    B_cols = scoring.base_as_experts(B_all, E, [s.model for s in specs])
    own, own_minus_other = own_other_gain(E, B_cols, val_cluster, [s.cluster for s in specs])
    g = settings["gating"]
    diff = cross_fitted_gain(X_val, E, B_all, evaluation.network_factory(g, g["seed"]), seed=g["seed"],
                             top_k=g["top_k"])
    return {"row": row.name, "changes": row.changes, "own_gain": own, "own_minus_other": own_minus_other,
            "moe2_minus_sa": diff["moe2"], "router_minus_sa": diff["router_top1"],
            "train_s_per_expert": float(np.mean([ft.wall_time_s_ for ft in fitted])), "n_validation": len(val),
            "reused": reused}


def _scored(items, path: Path, names, reuse: bool, build, normalisation: str, workers: int) -> Scores:
    """Scores of ``items`` at ``path``: the file already there when ``reuse`` and it holds these questions
    and these models, else the models ``build()`` gives, scored (resumable)."""
    if reuse and path.exists():
        old = Scores.load(path)
        if old.qid.astype(str).tolist() == [it.qid for it in items] and old.experts.astype(str).tolist() == names:
            return old
    return scoring.score_items(items, build(), path, normalisation=normalisation, workers=workers)


def earlier_rows(out: Path, profile: str, rows: list[Row], base: dict | None = None) -> dict[str, dict]:
    """The results already in ``<out>/ablation.json`` for this profile and base whose row is still in
    ``rows`` with the same changes, by name: a later run of other rows keeps them in the table."""
    path = Path(out) / "ablation.json"
    if not path.exists():
        return {}
    old = artifacts.read_json(path)
    if old.get("profile") != profile or old.get("base", {}) != (base or {}):
        return {}
    changes = {r.name: r.changes for r in rows}
    return {r["row"]: r for r in old.get("rows", []) if changes.get(r["row"]) == r.get("changes")}


def run(profile: str, rows_path, out, *, only=None, workers: int = 2, n_threads: int = 2, log=print) -> list[dict]:
    """Every row (or those named in ``only``) in order; ``<out>/ablation.json`` and ``table.csv`` are
    rewritten after each row, so a stopped ablation keeps what it measured. They also keep the rows measured
    by earlier runs into ``out`` (:func:`earlier_rows`), in the file's order; each row records its commit."""
    all_rows = load_rows(rows_path)
    rows = all_rows
    if only:
        unknown = sorted(set(only) - {r.name for r in rows})
        if unknown:
            raise InputError(f"no rows named {unknown} in the ablation file", path=rows_path, param="rows")
        rows = [r for r in rows if r.name in only]
    base = load_base(rows_path)
    settings = _settings(profile)
    out = Path(out)
    done = earlier_rows(out, profile, all_rows, base)
    results = []
    for row in rows:
        t0 = time.time()
        measured = run_row(Row(row.name, {**base, **row.changes}), settings, out, workers=workers,
                           n_threads=n_threads, log=log)
        results.append({**measured, "changes": row.changes, "wall_s": round(time.time() - t0, 1),
                        "git_commit": artifacts.git_commit()})
        done[row.name] = results[-1]
        write_results(out, profile, [done[r.name] for r in all_rows if r.name in done], base)
        r = results[-1]
        log(f"[{row.name}] own {100 * r['own_gain']:+.1f}, own-other {100 * r['own_minus_other']:+.1f}, "
            f"MoE2-S.A. {100 * r['moe2_minus_sa']:+.1f} points on {r['n_validation']} validation questions")
    return results


def write_results(out: Path, profile: str, results: list[dict], base: dict | None = None) -> None:
    """``ablation.json`` (with provenance) and ``table.csv`` (points, one decimal), written atomically."""
    artifacts.write_json(out / "ablation.json", {"profile": profile, "base": base or {}, "rows": results})
    lines = [",".join(COLUMNS)]
    for r in results:
        lines.append(",".join([f'"{r["row"]}"'] + [f"{100 * r[c]:.1f}" for c in COLUMNS[1:5]]
                              + [f"{r['train_s_per_expert']:.0f}", str(r["n_validation"])]))
    artifacts.write_text(out / "table.csv", "\n".join(lines) + "\n")
