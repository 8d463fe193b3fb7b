"""Figures of the pipeline; each returns a matplotlib Figure and draws from artifacts only."""

from __future__ import annotations

import numpy as np

from ..core.scores import Scores, letter_bias, subject_accuracy
from ..data.loaders import LETTERS


def subject_accuracy_figure(scores: Scores, title: str = "MMLU accuracy per subject"):
    """Heatmap of each expert's accuracy per subject, with chance (1/C) marked in the colour bar."""
    import matplotlib.pyplot as plt

    subjects, acc, counts = subject_accuracy(scores)
    order = np.argsort(-acc.mean(0))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * acc.shape[0] + 4), 0.2 * len(subjects) + 1.5))
    im = ax.imshow(acc[:, order].T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(subjects)), [f"{subjects[i].replace('_', ' ')} ({counts[i]})" for i in order],
                  fontsize=6)
    ax.set_xticks(range(acc.shape[0]), [f"{e}\n{a:.1%}" for e, a in zip(scores.experts, scores.accuracy())],
                  fontsize=7)
    cbar = fig.colorbar(im, ax=ax, fraction=0.05)
    cbar.ax.axhline(1 / scores.probs.shape[-1], color="white", lw=2)
    cbar.set_label("accuracy (white line: chance)")
    ax.set_title(f"{title} (n={scores.n})")
    return fig


def letter_bias_figure(scores: Scores, title: str = "Answer-letter bias"):
    """Share of answers per letter for each expert against the share of correct answers per letter."""
    import matplotlib.pyplot as plt

    chosen, gold = letter_bias(scores)
    k, c = chosen.shape
    fig, ax = plt.subplots(figsize=(1.2 * c * max(1, k / 2) + 3, 3.5))
    width = 0.8 / k
    x = np.arange(c)
    for j in range(k):
        ax.bar(x + (j - (k - 1) / 2) * width, chosen[j], width, label=str(scores.experts[j]))
    ax.step(np.r_[x - 0.5, c - 0.5], np.r_[gold, gold[-1]], where="post", color="k", lw=1.5,
            label="correct answers")
    ax.set_xticks(x, list(LETTERS[:c]))
    ax.set_ylabel("share of answers")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title} (n={scores.n})")
    return fig


def chance_per_question(scores: Scores) -> np.ndarray:
    """1 / (number of choices) of each question → (N,)."""
    c = scores.probs.shape[-1]
    return 1.0 / (np.full(scores.n, c) if scores.n_choices is None else np.asarray(scores.n_choices))


def task_accuracy(scores: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per task (``subject``): (tasks[T], accuracy[K, T], chance[T], questions per task[T])."""
    tasks, acc, counts = subject_accuracy(scores)
    inverse = np.unique(scores.subject, return_inverse=True)[1]
    chance = np.bincount(inverse, weights=chance_per_question(scores)) / counts
    return tasks, acc, chance, counts


def task_accuracy_figure(scores: Scores, title: str = "Accuracy above chance per task"):
    """Who knows what: each model's accuracy minus chance per task (points), annotated, tasks as rows."""
    import matplotlib.pyplot as plt

    tasks, acc, chance, counts = task_accuracy(scores)
    delta = 100 * (acc - chance[None, :])
    lim = max(10.0, float(np.nanmax(np.abs(delta))))
    fig, ax = plt.subplots(figsize=(0.75 * acc.shape[0] + 4, 0.3 * len(tasks) + 1.8))
    im = ax.imshow(delta.T, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
    for t in range(len(tasks)):
        for j in range(acc.shape[0]):
            ax.text(j, t, f"{100 * acc[j, t]:.0f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(tasks)), [f"{t} (n={n}, chance {100 * c:.0f})" for t, n, c in zip(tasks, counts, chance)],
                  fontsize=7)
    overall = scores.accuracy()
    ax.set_xticks(range(acc.shape[0]), [f"{e}\n{100 * a:.1f}%" for e, a in zip(scores.experts, overall)],
                  fontsize=6, rotation=45, ha="right")
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("accuracy minus chance (points); numbers: accuracy %")
    ax.set_title(f"{title} (n={scores.n})", fontsize=9)
    return fig
