"""Score a multiple-choice data set with a list of experts into the scores artifact.

The artifact (one ``.npz``, no pickle) holds ``probs[N, K, C]`` (each expert's distribution over
the choice letters), ``answer[N]``, ``task[N]`` (saved as ``subject``), ``qid[N]``, ``n_tokens[N, K]`` (prompt length in
each expert's tokens) and ``experts[K]``. Work is checkpointed every few questions into a
``<name>.partial/`` folder, so an interrupted run resumes where it stopped; the final file is
written atomically and the partial folder removed only then.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.scores import Scores, concat_experts, concat_rows
from ..data.loaders import DEFAULT_TEMPLATE, Question, format_prompt
from ..errors import InputError, Moe2Error
from ..infra import artifacts, parallel


def score_questions(questions: Sequence[Question], experts, out_path, *, template: str = DEFAULT_TEMPLATE,
                    chunk: int = 32, progress: bool = True, workers: int = 1, scheduler: str | None = None) -> Scores:
    """Score every question by its answer letter with every expert; resumable, written atomically to ``out_path``.

    ``workers > 1`` scores in that many processes at once, ``scheduler`` on Dask workers (see
    :func:`_per_process`).
    """
    if not questions:
        raise InputError("no questions to score", param="questions")
    if parallel.check_workers(workers) > 1 or scheduler is not None:
        return _per_process(score_questions, questions, experts, out_path, workers, [q.source for q in questions],
                            scheduler, template=template, chunk=chunk)
    n_choices = {len(q.choices) for q in questions}
    if len(n_choices) != 1:
        raise InputError(f"questions have different numbers of choices {sorted(n_choices)}", param="questions")
    c = n_choices.pop()
    prompts = [format_prompt(q, template) for q in questions]

    def score(expert, rows):
        batch = [prompts[i] for i in rows]
        return expert.choice_probs(batch, c), [expert.count_tokens(p) for p in batch]

    return _score_resumable(experts, out_path, score, qid=[q.source for q in questions], work=prompts,
                            answer=[q.answer for q in questions], task=[q.subject for q in questions],
                            width=c, chunk=chunk, progress=progress)


def score_items(items, experts, out_path, *, normalisation: str = "char", width: int | None = None,
                chunk: int = 32, progress: bool = True, workers: int = 1, scheduler: str | None = None) -> Scores:
    """Score :class:`~moe2lib.data.tasks.ChoiceItem`s by the likelihood of each choice's text; resumable, atomic.

    Each expert's distribution over a question's choices is the softmax of its normalised continuation
    log-likelihoods (:func:`moe2lib.core.choice.normalise`); rows are padded with zeros to ``width`` choices
    (default: the most any item has) and ``n_choices`` records the real count. ``n_tokens`` is the length
    of the (first choice's) prompt in each expert's tokens. ``workers > 1`` scores in that many processes
    at once, ``scheduler`` on Dask workers (see :func:`_per_process`).
    """
    from ..core import choice

    if not items:
        raise InputError("no questions to score", param="items")
    width = width or max(it.n_choices for it in items)
    if parallel.check_workers(workers) > 1 or scheduler is not None:
        return _per_process(score_items, items, experts, out_path, workers, [it.qid for it in items],
                            scheduler, normalisation=normalisation, width=width, chunk=chunk)
    requests = [it.pairs() for it in items]

    def score(expert, rows):
        probs = np.zeros((len(rows), width), dtype=np.float32)
        for r, z in enumerate(choice.score(expert, [requests[i] for i in rows], normalisation)):
            probs[r, :len(z)] = choice.choice_distribution(z)
        return probs, [expert.count_tokens(items[i].contexts[0]) for i in rows]

    return _score_resumable(experts, out_path, score, qid=[it.qid for it in items],
                            work=[[requests[i], normalisation] for i in range(len(items))],
                            answer=[it.gold for it in items], task=[it.task for it in items], width=width,
                            n_choices=[it.n_choices for it in items], chunk=chunk, progress=progress)


def _keyed_folder(folder: Path, key: str, **about) -> None:
    """A checkpoint folder for the work ``key`` names: one left by other work (or without its manifest)
    is removed, so a rerun never reuses stale parts."""
    manifest = folder / "manifest.json"
    if folder.exists() and (not manifest.exists() or artifacts.read_json(manifest).get("key") != key):
        shutil.rmtree(folder)
    artifacts.write_json(manifest, {"key": key, **about})


def _cost(expert) -> float:
    """Relative work of scoring with ``expert``: the size of its model file, 1.0 if unknown (compute per token
    grows with the weights; Gemma-3-270M's file is twice SmolLM2-135M's, and it takes ~1.35x as long on
    edge-mix)."""
    from .registry import locate

    try:
        path = locate(expert.model)
    except (Moe2Error, OSError):  # the worker that loads it will say what is wrong
        return 1.0
    return float(path.stat().st_size) if path.is_file() else 1.0


def _per_process(fn, work, experts, out_path, workers: int, qid, scheduler=None, **kwargs) -> Scores:
    """``fn(work[rows], [expert], ...)`` for each expert and shard of rows in ``workers`` processes (or on the
    Dask workers of ``scheduler``, see :func:`moe2lib.infra.parallel.run`), then one Scores at ``out_path``.

    Each expert's rows are cut into ``workers`` shards and the costliest jobs start first (:func:`_cost`
    times the shard's rows): with whole experts as jobs, two base models of unequal size on two workers
    left one worker idle for a quarter of the stage (the default run's base models: 535 s -> 455 s, for 2%
    fewer questions). Each shard's scores are saved here to ``<out>.experts/<j>-<s>.npz`` as soon as it is
    done, so a rerun scores only the missing ones (a local worker also checkpoints inside its shard); the
    folder is keyed by the questions, the options, the shards and the experts' identities, and removed once
    the whole result is written. The experts are sent unloaded: each worker loads its own model.
    """
    out_path = Path(out_path)
    folder = out_path.with_name(out_path.name + ".experts")
    shards = [r for r in np.array_split(np.arange(len(work)), workers) if len(r)]
    key = artifacts.digest({"qid": list(qid), "options": kwargs, "experts": [e.label for e in experts],
                            "identity": [e.identity() for e in experts], "shards": [len(r) for r in shards]})
    _keyed_folder(folder, key)
    jobs = [(j, s) for j in range(len(experts)) for s in range(len(shards))]
    paths = {(j, s): folder / f"{j}-{s}.npz" for j, s in jobs}
    todo = [js for js in jobs if not paths[js].exists()]
    cost = {j: _cost(e) for j, e in enumerate(experts)}
    parallel.run(fn, [([work[i] for i in shards[s]], [experts[j]], paths[j, s]) for j, s in todo], workers,
                 scheduler=scheduler, on_result=lambda i, scores: scores.save(paths[todo[i]]),
                 cost=[cost[j] * len(shards[s]) for j, s in todo],
                 desc=f"scoring {out_path.name} ({workers} processes)", progress=False, **kwargs)
    scores = concat_experts(*[concat_rows(*[Scores.load(paths[j, s]) for s in range(len(shards))])
                              for j in range(len(experts))])
    if not np.array_equal(scores.qid, np.asarray(qid)):
        raise RuntimeError(f"the shards of {out_path.name} came back out of order")  # a bug, not bad input
    scores.save(out_path)
    shutil.rmtree(folder, ignore_errors=True)
    return scores


def _score_resumable(experts, out_path, score, *, qid, work, answer, task, width: int, n_choices=None,
                     chunk: int, progress: bool) -> Scores:
    """Run ``score(expert, rows) -> (probs[len(rows), width], n_tokens)`` over all rows and experts.

    Checkpointed per expert every ``chunk`` rows into ``<out>.partial/`` keyed by the questions, the work
    (prompts), the expert names and identities (a retrained adapter is new work); the result is written
    atomically and the checkpoint removed only then.
    """
    out_path = Path(out_path)
    labels = [e.label for e in experts]
    if len(set(labels)) != len(labels):
        raise InputError(f"expert names must be unique, got {labels}", param="experts")
    n, k = len(qid), len(experts)
    partial = out_path.with_name(out_path.name + ".partial")
    key = artifacts.digest({"qid": list(qid), "prompts": work, "experts": labels,
                            "identity": [e.identity() for e in experts]})
    _keyed_folder(partial, key, experts=labels, n=n)

    probs = np.zeros((n, k, width), dtype=np.float32)
    n_tokens = np.zeros((n, k), dtype=np.int32)
    done = np.zeros(k, dtype=np.int64)
    for j, label in enumerate(labels):
        part = partial / f"expert{j}.npz"
        if part.exists():
            d = artifacts.read_npz(part)
            m = len(d["probs"])
            probs[:m, j], n_tokens[:m, j], done[j] = d["probs"], d["n_tokens"], m
    if progress and done.any():  # say what is reused, so a resumed run's log shows it
        print(f"{out_path.name}: resuming from the checkpoint in {partial.name}/, {int(done.sum())} of {n * k} "
              f"scores already done ({', '.join(f'{lab}: {int(d)}' for lab, d in zip(labels, done))})")

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * k, initial=int(done.sum()), desc=f"scoring {out_path.name}", unit="q")
    for j, expert in enumerate(experts):
        if done[j] >= n:
            continue
        try:
            for start in range(int(done[j]), n, chunk):
                stop = min(n, start + chunk)
                probs[start:stop, j], n_tokens[start:stop, j] = score(expert, range(start, stop))
                artifacts.write_npz(partial / f"expert{j}.npz", probs=probs[:stop, j], n_tokens=n_tokens[:stop, j])
                if bar is not None:
                    bar.update(stop - start)
        finally:
            expert.close()
    if bar is not None:
        bar.close()
    scores = Scores(probs=probs, answer=np.asarray(answer, dtype=np.int64), task=np.array(task),
                    qid=np.array(qid), n_tokens=n_tokens, experts=np.array(labels),
                    n_choices=None if n_choices is None else np.asarray(n_choices, dtype=np.int64))
    scores.save(out_path)
    shutil.rmtree(partial, ignore_errors=True)
    return scores


def base_columns(base: Scores, base_models) -> np.ndarray:
    """Column of ``base`` holding each named base model (labels as ``models.display_name`` gives them)."""
    from .registry import display_name

    names = base.experts.tolist()
    out = []
    for m in base_models:
        label = display_name(m)
        if label not in names:
            raise InputError(f"base model {label!r} is not in the base scores (they hold {names})",
                             param="base_model")
        out.append(names.index(label))
    return np.array(out, dtype=np.int64)


def base_as_experts(base: Scores, experts_scores: Scores, base_models) -> Scores:
    """``base`` with one column per expert: expert j's un-tuned base model (``base_models[j]``), named after
    the expert, on the same rows. What an expert's gain over its base is measured against."""
    col = base_columns(base, base_models)
    return Scores(base.probs[:, col], base.answer, base.task, base.qid, base.n_tokens[:, col],
                  experts_scores.experts, base.n_choices)
