"""Token-level fusion of experts' next-token distributions (paper eq. (29)), over text.

Each expert reports only its top-n next tokens, as strings with probabilities (a server's
``top_logprobs``). Experts may use different tokenizers (SmolLM2, Gemma), so candidates are aligned on
their TEXT, as GaC and UniTE do: the candidate set is the union U of the strings the experts propose, the
fused distribution is eq. (29) on U, and the chosen string is appended to the common text, which every
expert re-tokenises on its next request.

Two documented choices (our reading; the paper fuses full-vocabulary distributions of one tokenizer):

* ``remainder`` — the mass 1 − Σ top-n an expert puts outside its top-n:
  ``"drop"`` (default): each expert's top-n is renormalised to sum to 1, so a candidate it did not
  propose gets 0 from it; ``"uniform"``: the remainder is spread uniformly over the vocabulary tokens
  outside its top-n, so a candidate it did not propose gets ``remainder / (vocab_size − n)``.
* ``prefix`` — cross-tokenizer alignment: when an expert did not propose candidate c but proposed a
  strict prefix of it (Gemma's " Parisian" vs SmolLM2's " Paris"), it is credited with the probability
  of its longest such prefix — the probability of the first step it would take towards c (UniTE's rule,
  with the expert's own top-n standing in for its tokenizer). Off: exact string matches only.

The fused scores are normalised over U, i.e. (29) conditioned on the next text being in U. With
``remainder="drop"`` and ``prefix=False`` no normalisation is needed: it is exactly (29) on the
renormalised top-n distributions. The empty string ``STOP`` stands for end of text (llama-cpp-python's
server detokenises EOS and other special tokens to "").

The weights are :func:`moe2lib.core.gating.subset_weights` (eqs. (2), (28)) of the Top-k
:func:`moe2lib.core.gating.topk_mask` (eqs. (26)–(27)); the weighted sum is :func:`moe2lib.core.gating.fuse` (eq. (3)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from . import gating

STOP = ""
REMAINDERS = ("drop", "uniform")
DEFAULT_VOCAB = 50_000  # vocabulary size assumed for remainder="uniform" when an expert's is unknown


def probs_from_logprobs(top: Mapping[str, float]) -> dict[str, float]:
    """A server's ``{token string: logprob}`` as probabilities (strings are already merged by the server)."""
    with np.errstate(over="ignore"):  # a (malformed) logprob > 709 gives inf, which callers reject
        return {str(s): float(np.exp(float(lp))) for s, lp in top.items() if lp is not None and np.isfinite(lp)}


@dataclass
class Fused:
    """The fused distribution of one step: candidates, their probabilities, each expert's credited scores."""

    candidates: list[str]
    probs: np.ndarray                 # (|U|,) sums to 1
    expert_scores: np.ndarray         # (K, |U|) p̃_k(c) before weighting
    weights: np.ndarray               # (K,) the weights used (sum to 1)
    names: list[str] = field(default_factory=list)

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[:n]
        return [(self.candidates[i], float(self.probs[i])) for i in order]

    def argmax(self) -> str:
        return self.candidates[int(np.argmax(self.probs))]


def expert_scores(top: Mapping[str, float], candidates: Sequence[str], *, remainder: str = "drop",
                  prefix: bool = True, vocab_size: int | None = None) -> np.ndarray:
    """p̃_k(c) for every candidate c: the expert's probability, its prefix credit, or its remainder share."""
    if remainder not in REMAINDERS:
        raise InputError(f"remainder must be one of {REMAINDERS}, got {remainder!r}", param="remainder")
    p = {s: max(float(v), 0.0) for s, v in top.items()}
    if not all(np.isfinite(v) for v in p.values()):
        raise InputError(f"an expert's top-n probabilities must be finite, got {list(p.values())[:10]}", param="top")
    mass = sum(p.values())
    if not mass > 0 or not np.isfinite(mass):
        raise InputError("an expert's top-n distribution has no mass", param="top")
    if remainder == "drop":
        p = {s: v / mass for s, v in p.items()}
        rest = 0.0
    else:
        mass = min(mass, 1.0)
        outside = max((vocab_size or DEFAULT_VOCAB) - len(p), 1)
        rest = (1.0 - mass) / outside
    own = sorted((s for s in p if s != STOP), key=len, reverse=True)
    out = np.empty(len(candidates))
    for j, c in enumerate(candidates):
        if c in p:
            out[j] = p[c]
            continue
        credit = next((p[s] for s in own if prefix and c != STOP and len(s) < len(c) and c.startswith(s)), None)
        out[j] = rest if credit is None else credit
    return out


def fuse_text(weights: Sequence[float], tops: Sequence[Mapping[str, float]], *, remainder: str = "drop",
              prefix: bool = True, vocab_sizes: Sequence[int | None] | None = None,
              names: Sequence[str] = ()) -> Fused:
    """Eq. (29) over the union of the experts' top-n strings: p(c) ∝ Σ_k w_k p̃_k(c) (eq. (3) on p̃)."""
    w = np.asarray(weights, dtype=float)
    if len(tops) != len(w) or len(tops) == 0:
        raise InputError(f"{len(tops)} distributions but {len(w)} weights", param="weights")
    if np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise InputError(f"weights must be non-negative and sum to 1, got {w.tolist()}", param="weights")
    candidates: list[str] = []
    seen = set()
    for top in tops:
        for s in sorted(top, key=lambda s: -top[s]):
            if s not in seen:
                seen.add(s)
                candidates.append(s)
    sizes = list(vocab_sizes) if vocab_sizes is not None else [None] * len(tops)
    scores = np.stack([expert_scores(t, candidates, remainder=remainder, prefix=prefix, vocab_size=v)
                       for t, v in zip(tops, sizes)])
    fused = gating.fuse(w[None], scores[None])[0]
    total = fused.sum()
    if not (total > 0 and np.isfinite(total)):  # every product underflowed (subnormal probabilities): in logs
        with np.errstate(divide="ignore"):
            lf = np.logaddexp.reduce(np.log(w)[:, None] + np.log(scores), axis=0)
        fused = np.exp(lf - lf.max())
        total = fused.sum()
    return Fused(candidates, fused / total, scores, w, list(names))


def choose(fused: Fused, temperature: float = 0.0, rng: np.random.Generator | None = None) -> str:
    """Argmax (temperature 0) or a sample from p^(1/T), renormalised, with the given generator."""
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0, got {temperature}", param="temperature")
    if temperature == 0:
        return fused.argmax()
    logp = np.log(np.maximum(fused.probs, 1e-300))
    with np.errstate(over="ignore"):  # max subtracted before dividing: a tiny T gives -inf, never NaN
        q = np.exp((logp - logp.max()) / temperature)
    q /= q.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return fused.candidates[int(rng.choice(len(q), p=q))]


def steps_figure(steps: Sequence[dict]):
    """The first 8 steps of a fused generation (``trace.json``'s steps): the fused top-5 candidates as bars
    (the one chosen dark) and each expert's own renormalised probability of them as markers."""
    import matplotlib.pyplot as plt

    steps = list(steps)[:8]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6), squeeze=False)
    names = list(steps[0]["weights"]) if steps else []
    for ax, s in zip(axes.ravel(), steps):
        cands = s["fused_top"][:5]
        y = np.arange(len(cands))
        ax.barh(y, [p for _, p in cands], color=["#1f4e79" if c == s["text"] else "#9dc3e6" for c, _ in cands])
        for j, n in enumerate(names):
            own = dict(s["expert_top"].get(n, []))
            mass = sum(own.values()) or 1.0
            ax.scatter([own.get(c, 0.0) / mass for c, _ in cands], y, marker="o^sv"[j % 4], s=25, zorder=3,
                       label=f"{n} (w={s['weights'].get(n, 0):.2f})")
        ax.set_yticks(y, [repr(c)[1:-1] or "<end>" for c, _ in cands])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"step {s['index']}: {s['text']!r}", fontsize=9)
    for ax in axes.ravel()[len(steps):]:
        ax.axis("off")
    if steps:
        axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Fused next-token distribution (29) over the experts' top-n strings")
    fig.tight_layout()
    return fig
