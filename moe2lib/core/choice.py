"""Multiple-choice answers scored by the likelihood of each choice's text (lm-eval's acc / acc_norm).

An expert's ``continuation_logprobs`` gives, per question, log p(continuation | context) summed over
the continuation's tokens. Tiny models are at chance on the answer *letter* but above chance this way.
Here those sums are normalised (``normalise``), turned into distributions over the choices
(``choice_distribution``), padded to a fixed width (``pad``) and calibrated (``fit_temperature``).

"char" normalisation divides by the continuation's length in characters (Python ``len`` of the string,
leading space included), as lm-evaluation-harness's ``acc_norm`` does; its ``acc_bytes`` would use UTF-8
bytes, which differ only for non-ASCII text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError

NORMALISATIONS = ("char", "none", "token", "pmi")
PMI_CONTEXT = "Answer:"

Request = Sequence[tuple[str, str]]


def normalise(logprob, n_tokens, n_chars, method: str = "char", unconditional=None) -> np.ndarray:
    """One question's choice scores from summed log-probabilities (arrays over its choices).

    "char": per character; "token": per token; "none": the raw sum (favours short choices);
    "pmi": minus ``unconditional``, the same continuation's log-probability after the bare
    ``PMI_CONTEXT`` (see ``unconditional_requests``), which cancels how likely the text is anyway.
    """
    lp = np.asarray(logprob, dtype=np.float64)
    if method == "char":
        return lp / np.maximum(np.asarray(n_chars, dtype=np.float64), 1)
    if method == "token":
        return lp / np.maximum(np.asarray(n_tokens, dtype=np.float64), 1)
    if method == "none":
        return lp.copy()
    if method == "pmi":
        if unconditional is None:
            raise InputError("pmi normalisation needs the unconditional log-probabilities", param="unconditional")
        return lp - np.asarray(unconditional, dtype=np.float64)
    raise InputError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}", param="method")


def unconditional_requests(requests: Sequence[Request], context: str = PMI_CONTEXT) -> list[list[tuple[str, str]]]:
    """The requests for "pmi": each continuation after the bare ``context`` instead of its question."""
    return [[(context, cont) for _, cont in req] for req in requests]


def score(expert, requests: Sequence[Request], method: str = "char", progress: bool = False) -> list[np.ndarray]:
    """Normalised choice scores per question (one float64 array per request) from ``expert``."""
    raw = expert.continuation_logprobs(requests, progress=progress)
    uncond = ([lp for lp, _ in expert.continuation_logprobs(unconditional_requests(requests), progress=progress)]
              if method == "pmi" else [None] * len(raw))
    return [normalise(lp, nt, [len(c) for _, c in req], method, u)
            for (lp, nt), req, u in zip(raw, requests, uncond)]


def choice_distribution(scores, temperature: float = 1.0) -> np.ndarray:
    """Softmax of one question's scores divided by ``temperature``."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def pad(arrays: Sequence[np.ndarray], width: int = 5, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-question arrays of 2..``width`` choices into (values[N, width], mask[N, width]).

    Padded slots hold ``fill`` (0 for probabilities, so rows still sum to 1) and mask False.
    """
    out = np.full((len(arrays), width), fill, dtype=np.float64)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, a in enumerate(arrays):
        if len(a) > width:
            raise InputError(f"question {i} has {len(a)} choices, more than the width {width}", param="width")
        out[i, :len(a)] = a
        mask[i, :len(a)] = True
    return out, mask


def _log_softmax_masked(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    z = np.where(mask, z, -np.inf)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def nll(scores: np.ndarray, mask: np.ndarray, gold, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold choices under softmax(scores / temperature)."""
    lp = _log_softmax_masked(scores / temperature, mask)
    return float(-lp[np.arange(len(lp)), np.asarray(gold)].mean())


def fit_temperature(scores, gold, mask=None, bounds=(0.01, 100.0)) -> float:
    """The temperature minimising the gold choices' NLL (bounded 1-D search over log T).

    ``scores`` is a list of per-question score arrays, or padded scores[N, C] with ``mask``.
    """
    from scipy.optimize import minimize_scalar

    if mask is None:
        scores, mask = pad(scores, width=max(len(s) for s in scores))
    scores, mask = np.asarray(scores, dtype=np.float64), np.asarray(mask, dtype=bool)
    res = minimize_scalar(lambda lt: nll(scores, mask, gold, np.exp(lt)),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))
