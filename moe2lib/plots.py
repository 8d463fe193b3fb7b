"""Figures of the pipeline; each returns a matplotlib Figure and draws from artifacts only."""

from __future__ import annotations

import numpy as np

from .data import LETTERS
from .scoring import Scores, letter_bias, subject_accuracy


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
