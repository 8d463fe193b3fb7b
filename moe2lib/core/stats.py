"""Statistics shared by the analyses: seeded percentile bootstrap intervals of paired per-prompt values, and
seeded samples stratified by group (subject, task)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, check_int


RESAMPLES = ("counts", "indices")


def bootstrap_means(values, n_bootstrap: int = 1000, seed=0, *, resample: str = "counts") -> np.ndarray:
    """Means of ``values`` [M, N] over ``n_bootstrap`` resamples of the N prompts (shared by all M rows) → [M, B].

    ``seed`` is a seed or a ``numpy.random.Generator`` (drawn from, for several resamplings in a row).
    ``resample`` is how a resample is drawn: ``"counts"``, how often each prompt is taken, all at once
    (multinomial; Fig. 3's paired intervals), or ``"indices"``, N prompt indices uniformly (the own-cluster
    gains); both kinds are the same bootstrap, kept apart so that each seeded interval stays as it was.
    """
    if resample not in RESAMPLES:
        raise InputError(f"must be one of {RESAMPLES}, got {resample!r}", param="resample")
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = values.shape[1]
    n_bootstrap = check_int(n_bootstrap, "n_bootstrap")
    if n == 0:
        raise InputError("no prompts to resample", param="values")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if resample == "indices":
        return values[:, rng.integers(0, n, size=(n_bootstrap, n))].mean(-1)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)  # [B, N]
    return values @ counts.T / n


def percentile_interval(samples, level: float = 0.95) -> np.ndarray:
    """Percentile interval of bootstrap samples [..., B] → [..., 2]."""
    a = (1 - level) / 2
    return np.moveaxis(np.quantile(np.asarray(samples), [a, 1 - a], axis=-1), 0, -1)


def bootstrap_ci(values, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> np.ndarray:
    """Seeded percentile bootstrap interval of the mean of each row of ``values`` [M, N] → [M, 2]."""
    return percentile_interval(bootstrap_means(values, n_bootstrap, seed), level)


def relative_improvement(a, b):
    """The paper's form ``(a - b) / b`` (e.g. +14.4% of MoE2 over Single Agent)."""
    return (np.asarray(a, dtype=np.float64) - b) / b


REMAINDERS = ("largest", "random")


def stratified_sample(groups, n: int, seed: int, *, remainder: str = "largest") -> np.ndarray:
    """Seeded sorted indices of exactly ``n`` of the rows, spread over their ``groups`` (a label per row) in
    proportion.

    Each group's quota is ``n * size / total`` and it gets the floor; the rows left over go by ``remainder``:

    * ``"largest"`` — every group gets at least 1 when ``n`` is at least the number of groups, then the
      rest goes one at a time to the largest shortfall (or is taken back from the largest excess), ties to
      the first group in sorted order (the profiles stage's MMLU sample, ``data --sample``);
    * ``"random"`` — one each to groups drawn at random (``evaluate``'s new test split).

    Then each group's rows are drawn without replacement, groups in sorted order, from one generator.
    """
    if remainder not in REMAINDERS:
        raise InputError(f"must be one of {REMAINDERS}, got {remainder!r}", param="remainder")
    labels = np.asarray(groups).astype(str)
    n = check_int(n, "n", high=len(labels))
    names, sizes = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    if remainder == "largest":
        quota = sizes * n / sizes.sum()
        take = np.floor(quota).astype(np.int64)
        if n >= len(names):
            take = np.maximum(take, 1)
        while take.sum() < n:
            take[np.argmax(np.where(take < sizes, quota - take, -np.inf))] += 1
        while take.sum() > n:
            take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    else:
        take = np.floor(n / len(labels) * sizes).astype(np.int64)
        take[rng.permutation(len(names))[: n - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == g), size=t, replace=False) for g, t in zip(names, take)]
    return np.sort(np.concatenate(picked).astype(np.int64))
