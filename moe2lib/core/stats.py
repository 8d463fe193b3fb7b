"""Statistics shared by the analyses: seeded percentile bootstrap intervals of paired per-prompt values."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, check_int


def bootstrap_means(values, n_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of ``values`` [M, N] over ``n_bootstrap`` resamples of the N prompts (shared by all M rows) → [M, B]."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = values.shape[1]
    n_bootstrap = check_int(n_bootstrap, "n_bootstrap")
    if n == 0:
        raise InputError("no prompts to resample", param="values")
    rng = np.random.default_rng(seed)
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
