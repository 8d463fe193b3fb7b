"""Subset selection for the reduced problem (19): Subset Monotonic Optimisation (Alg. 2).

The problem is ``min_S L(S)`` subject to ``max_{k in S} delay_k <= delay_budget`` and
``sum_{k in S} energy_k <= energy_budget``, where ``L`` is monotone non-increasing in ``S``
(Theorem 2: adding experts never increases the loss). Equivalently, maximise the monotone
``f(S) = -L(S)`` over a normal (down-closed) subset of ``{0,1}^K``: a discrete monotonic
optimisation in the sense of Minoux & Tuy.

:func:`select_subset` solves it by a polyblock outer approximation organised as a best-first
branch and bound:

* experts whose own delay or energy exceeds a budget are removed up front (the delay constraint is
  a max, so it is a filter; what is left is a knapsack, a normal set);
* each open box ``{S : F <= S <= z}`` is a polyblock vertex ``z`` (with experts ``F`` fixed in);
  ``L(z)`` is a lower bound on the loss of every subset in the box, by monotonicity, whether or
  not ``z`` itself is feasible;
* an infeasible vertex is replaced by its proper vertices ``z - {i}`` (branching on high-energy
  experts first, the earlier free experts fixed in, so that no subset is covered twice), each
  reduced to the experts that can still fit, and dropped when it holds no *maximal* feasible
  subset (the optimum of a monotone loss is attained at a maximal one);
* incumbents come from greedy starts improved by 1-swap local search, from feasible vertices and,
  optionally, from projections of infeasible vertices onto the feasible set; a box is pruned when
  ``L(z) >= incumbent - eps``. Losses are evaluated in vectorised batches and memoised, and the
  boxes with the least bounds are expanded first, so the least open bound is a certified lower
  bound whenever the search stops (time or evaluation limit).

Losses with more structure get tighter box bounds (``bounds=``): with diminishing returns
(supermodular ``L``), knapsack LP relaxations over the marginal gains at both ends of a box; with a
convex extension to ``[0, 1]^K`` (the un-renormalised mixture ``-log sum_k g_k p_k``), Frank-Wolfe
on the box's LP relaxation, whose duality gap certifies K = 64 in seconds.

``eps = 0`` gives the exact optimum for a monotone loss. For a loss that is not monotone (a finite
gating network can break Theorem 2) the result is still feasible, but neither optimality nor the
``bound`` is certified; :func:`exhaustive_subset` gives the reference there.

A subset's delay is the max over its members (0 for the empty set), its energy the sum
(:func:`subset_delay`, :func:`subset_energy`; all feasibility decisions use these two functions).
The empty subset is never returned as a solution: when no single expert fits the budgets the result
has ``feasible=False``, an all-False mask and ``loss=inf``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError, check_int

__all__ = [
    "SubsetResult", "select_subset", "exhaustive_subset", "greedy_subset", "subset_delay",
    "subset_energy", "masks_to_int", "int_to_masks", "synthetic_instance", "SyntheticLoss",
    "DEVICE_CATALOGUE", "EXHAUSTIVE_MAX_K",
]

EXHAUSTIVE_MAX_K = 24
LossFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class SubsetResult:
    """A selected subset and how it was found.

    ``bound`` is a certified lower bound on the optimal loss over the feasible set (for a monotone
    loss): it equals ``loss`` when the subset was proved optimal, is ``-inf`` when the method gives
    no certificate (greedy) and ``inf`` when nothing is feasible. ``evaluations`` counts distinct
    subsets whose loss was computed.
    """

    mask: np.ndarray
    loss: float
    feasible: bool
    evaluations: int
    delay: float
    energy: float
    bound: float
    gap: float
    elapsed_s: float
    timed_out: bool = False
    method: str = "smo"
    status: str = "optimal"  # optimal | eps-optimal | time_limit | max_evaluations | infeasible | heuristic

    @property
    def experts(self) -> list[int]:
        """Indices of the selected experts."""
        return [int(i) for i in np.flatnonzero(self.mask)]


# ----------------------------------------------------------------------------- helpers

def subset_delay(mask, delay) -> np.ndarray | float:
    """Delay of each subset, eq. (7): the max over its members (0 for the empty set).

    ``mask`` is (K,) or (m, K) bool; returns a float or an (m,) array.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.where(mask, np.asarray(delay, dtype=float), 0.0).max(axis=-1, initial=0.0)
    return float(out) if out.ndim == 0 else out


def subset_energy(mask, energy) -> np.ndarray | float:
    """Energy of each subset, eq. (10): the sum over its members (0 for the empty set).

    This exact expression (a sum over all K columns, non-members as 0) defines feasibility
    everywhere in this module, so that rounding never makes two methods disagree.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.where(mask, np.asarray(energy, dtype=float), 0.0).sum(axis=-1)
    return float(out) if out.ndim == 0 else out


def masks_to_int(masks) -> list[int]:
    """Bool masks (m, K) (or one (K,)) to Python ints, bit k set when expert k is in."""
    masks = np.atleast_2d(np.asarray(masks, dtype=bool))
    weights = [1 << k for k in range(masks.shape[1])]
    return [sum(w for w, b in zip(weights, row) if b) for row in masks.tolist()]


def int_to_masks(ints, K: int) -> np.ndarray:
    """Ints (bit k = expert k) to bool masks of shape (m, K); vectorised for K <= 63."""
    if K <= 63:
        arr = np.asarray(ints, dtype=np.int64).reshape(-1)
        return ((arr[:, None] >> np.arange(K, dtype=np.int64)) & 1).astype(bool)
    return np.array([[(int(v) >> k) & 1 for k in range(K)] for v in ints], dtype=bool).reshape(-1, K)


def _pack(masks: np.ndarray) -> list[bytes]:
    """Hashable keys of bool rows."""
    packed = np.packbits(masks, axis=1)
    return [r.tobytes() for r in packed]


def _unpack(keys: list[bytes], K: int) -> np.ndarray:
    nb = (K + 7) // 8
    buf = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), nb)
    return np.unpackbits(buf, axis=1, count=K).astype(bool)


class _Codec:
    """Hashable keys of bool rows: Python ints (bit k = expert k) for K <= 64, packed bytes beyond."""

    def __init__(self, K: int):
        self.K, self.small = K, K <= 64

    def encode(self, masks: np.ndarray) -> list:
        if not self.small:
            return _pack(masks)
        padded = np.zeros((masks.shape[0], 64), dtype=bool)
        padded[:, :self.K] = masks
        return np.packbits(padded, axis=1, bitorder="little").view("<u8").ravel().tolist()

    def decode(self, keys: list) -> np.ndarray:
        if not self.small:
            return _unpack(keys, self.K)
        raw = np.array(keys, dtype="<u8").view(np.uint8).reshape(len(keys), 8)
        return np.unpackbits(raw, axis=1, count=self.K, bitorder="little").astype(bool)


def _ordered(values: np.ndarray) -> list[int]:
    """Non-negative ints in the order of the floats ``values`` (IEEE-754 bit trick), for the heap."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    neg = (bits >> np.uint64(63)) == 1
    return np.where(neg, ~bits, bits | np.uint64(1 << 63)).tolist()


# ----------------------------------------------------------------------------- validation

def _budget(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InputError(f"must be a real number, got {x!r}", param=name) from None
    if math.isnan(v):
        raise InputError("must not be NaN", param=name)
    if v < 0:
        raise InputError(f"must be non-negative, got {v}", param=name)
    return v


def _vector(x, name: str, K: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise InputError("must be an array of real numbers", param=name) from None
    if arr.ndim != 1:
        raise InputError(f"must have shape (K,), got shape {arr.shape}", param=name)
    if K is None and arr.size == 0:
        raise InputError("needs at least one expert", param=name)
    if K is not None and arr.shape != (K,):
        raise InputError(f"must have shape ({K},) like delay, got {arr.shape}", param=name)
    if not np.all(np.isfinite(arr)):
        raise InputError("must be finite", param=name)
    if np.any(arr < 0):
        raise InputError("must be non-negative", param=name)
    return arr


def _validate(delay, energy, delay_budget, energy_budget):
    d = _vector(delay, "delay")
    e = _vector(energy, "energy", d.size)
    return d, e, _budget(delay_budget, "delay_budget"), _budget(energy_budget, "energy_budget")


def _allowed(d, e, D, E, available) -> np.ndarray:
    """Experts that fit both budgets on their own and are available (``None``: all are)."""
    ok = (d <= D) & (e <= E)
    if available is None:
        return ok
    av = np.asarray(available)
    if av.shape != d.shape or av.dtype != bool:
        raise InputError(f"must be a bool array of shape {d.shape}, got {av.dtype} {av.shape}", param="available")
    return ok & av


class _Oracle:
    """The loss, evaluated in batches of at most ``batch_size`` rows, memoised by subset."""

    def __init__(self, loss: LossFn, K: int, batch_size: int):
        if not callable(loss):
            raise InputError("must be callable: bool masks (m, K) -> m losses", param="loss")
        self.loss, self.K, self.batch_size = loss, K, batch_size
        self.codec = _Codec(K)
        self.memo: dict = {}

    @property
    def evaluations(self) -> int:
        return len(self.memo)

    def _call(self, masks: np.ndarray) -> np.ndarray:
        try:
            out = np.asarray(self.loss(masks), dtype=float)
        except InputError:
            raise
        except (TypeError, ValueError) as exc:
            raise InputError(f"returned something that is not an array of reals ({exc})",
                             param="loss") from exc
        if out.shape != (masks.shape[0],):
            raise InputError(f"must return shape ({masks.shape[0]},) for masks of shape "
                             f"{masks.shape}, got {out.shape}", param="loss")
        if np.isnan(out).any() or (out == -np.inf).any():
            raise InputError("returned NaN or -inf", param="loss")
        return out

    def relaxed(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The loss's convex extension at fractional points X (m, K): (values (m,), gradients (m, K))."""
        try:
            val, grad = self.loss.relaxed(X)
            val, grad = np.asarray(val, dtype=float), np.asarray(grad, dtype=float)
        except (TypeError, ValueError) as exc:
            raise InputError(f".relaxed must return (values (m,), gradients (m, K)) ({exc})",
                             param="loss") from exc
        if val.shape != (X.shape[0],) or grad.shape != X.shape:
            raise InputError(f".relaxed must return shapes ({X.shape[0]},) and {X.shape}, got "
                             f"{val.shape} and {grad.shape}", param="loss")
        if not (np.isfinite(val).all() and np.isfinite(grad).all()):
            raise InputError(".relaxed returned non-finite values", param="loss")
        return val, grad

    def __call__(self, masks: np.ndarray, keys: list | None = None) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if keys is None:
            keys = self.codec.encode(masks)
        memo = self.memo
        todo: dict = {}
        for i, k in enumerate(keys):
            if k not in memo and k not in todo:
                todo[k] = i
        if todo:
            rows = np.fromiter(todo.values(), dtype=np.int64, count=len(todo))
            tkeys = list(todo)
            for s in range(0, rows.size, self.batch_size):
                vals = self._call(np.ascontiguousarray(masks[rows[s:s + self.batch_size]]))
                memo.update(zip(tkeys[s:s + self.batch_size], vals.tolist()))
        return np.fromiter((memo[k] for k in keys), dtype=float, count=len(keys))


def _result(mask, loss, delay, energy, evaluations, bound, t0, *, method, status, timed_out=False):
    mask = np.asarray(mask, dtype=bool).copy()
    feasible = bool(mask.any())  # every non-empty mask returned here was checked feasible
    if not feasible:
        loss, bound = math.inf, math.inf
    gap = 0.0 if loss == bound else float(loss - bound)
    return SubsetResult(mask=mask, loss=float(loss), feasible=feasible, evaluations=int(evaluations),
                        delay=float(subset_delay(mask, delay)), energy=float(subset_energy(mask, energy)),
                        bound=float(bound), gap=gap, elapsed_s=time.perf_counter() - t0,
                        timed_out=timed_out, method=method, status=status)


def _infeasible(K, delay, energy, t0, method):
    return _result(np.zeros(K, dtype=bool), math.inf, delay, energy, 0, math.inf, t0,
                   method=method, status="infeasible")


# ----------------------------------------------------------------------------- heuristics

class _Search:
    """State shared by the heuristics and the branch and bound of one :func:`select_subset` call."""

    def __init__(self, oracle: _Oracle, e: np.ndarray, E: float, allowed: np.ndarray,
                 deadline: float, max_evaluations: int | None):
        self.oracle, self.e, self.E, self.allowed = oracle, e, E, allowed
        self.K = e.size
        self.deadline, self.max_evaluations = deadline, max_evaluations
        self.best_mask = np.zeros(self.K, dtype=bool)
        self.best_loss = math.inf
        self.stop_reason = ""

    def out_of_budget(self) -> bool:
        if time.perf_counter() >= self.deadline:
            self.stop_reason = "time_limit"
        elif self.max_evaluations is not None and self.oracle.evaluations >= self.max_evaluations:
            self.stop_reason = "max_evaluations"
        return bool(self.stop_reason)

    def offer(self, masks: np.ndarray, losses: np.ndarray):
        """Take the best feasible row of ``masks`` as incumbent if it beats the current one."""
        if masks.shape[0] == 0:
            return
        ok = (subset_energy(masks, self.e) <= self.E) & masks.any(axis=1)
        if not ok.any():
            return
        cand = np.where(ok, losses, np.inf)
        i = int(np.argmin(cand))
        if cand[i] < self.best_loss:
            self.best_loss, self.best_mask = float(cand[i]), masks[i].copy()

    def fill(self, mask: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Add allowed experts in ``order`` while they fit (makes ``mask`` maximal)."""
        mask = mask.copy()
        used = subset_energy(mask, self.e)
        for k in order:
            if self.allowed[k] and not mask[k] and used + self.e[k] <= self.E:
                trial = mask.copy()
                trial[k] = True
                used_t = subset_energy(trial, self.e)
                if used_t <= self.E:
                    mask, used = trial, used_t
        return mask

    def greedy_add(self, per_joule: bool) -> np.ndarray:
        """Add the fitting expert with the best loss drop (per joule) until none fits or improves."""
        mask = np.zeros(self.K, dtype=bool)
        cur = math.inf
        while not self.out_of_budget():
            cand = np.flatnonzero(self.allowed & ~mask)
            if cand.size == 0:
                break
            trials = np.repeat(mask[None, :], cand.size, axis=0)
            trials[np.arange(cand.size), cand] = True
            fits = subset_energy(trials, self.e) <= self.E
            if not fits.any():
                break
            cand, trials = cand[fits], trials[fits]
            vals = self.oracle(trials)
            self.offer(trials, vals)
            if math.isinf(cur):  # first pick: the lowest loss (the empty set's loss is not used)
                j = int(np.argmin(vals))
            else:
                drop = cur - vals
                if per_joule:
                    drop = drop / np.maximum(self.e[cand], 1e-12)
                j = int(np.argmax(drop))
                if not drop[j] > 0:
                    break
            mask, cur = trials[j], float(vals[j])
        return mask

    def greedy_drop(self) -> np.ndarray:
        """From all allowed experts, drop the one costing least loss per joule until feasible."""
        mask = self.allowed.copy()
        cur = float(self.oracle(mask[None, :])[0])
        while subset_energy(mask, self.e) > self.E and not self.out_of_budget():
            cand = np.flatnonzero(mask)
            trials = np.repeat(mask[None, :], cand.size, axis=0)
            trials[np.arange(cand.size), cand] = False
            nonempty = trials.any(axis=1)
            cand, trials = cand[nonempty], trials[nonempty]
            if cand.size == 0:
                break
            vals = self.oracle(trials)
            self.offer(trials, vals)
            rise = (vals - cur) / np.maximum(self.e[cand], 1e-12)
            j = int(np.argmin(rise))
            mask, cur = trials[j], float(vals[j])
        return mask

    def project(self, Z: np.ndarray, F: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Feasible points below infeasible vertices: drop free experts of lowest ``score`` until
        the budget holds, then fill up with the best-scoring experts that fit."""
        fill_order = np.argsort(-score, kind="stable")
        out = []
        for z, f in zip(Z, F):
            m = z.copy()
            used = subset_energy(m, self.e)
            free = np.flatnonzero(z & ~f)
            for k in free[np.argsort(score[free], kind="stable")]:
                if used <= self.E:
                    break
                m[k] = False
                used = subset_energy(m, self.e)
            if used <= self.E and m.any():
                out.append(self.fill(m, fill_order))
        return np.array(out, dtype=bool).reshape(-1, self.K)

    def local_search(self, order: np.ndarray, rounds: int = 3):
        """1-swap improvement of the incumbent: drop one member, add one outsider, refill."""
        for _ in range(rounds):
            if self.out_of_budget() or not self.best_mask.any():
                return
            base, before = self.best_mask, self.best_loss
            ins, outs = np.flatnonzero(base), np.flatnonzero(self.allowed & ~base)
            trials = []
            for i in ins:
                if time.perf_counter() >= self.deadline:
                    break
                for j in outs:
                    t = base.copy()
                    t[i], t[j] = False, True
                    if subset_energy(t, self.e) <= self.E:
                        trials.append(self.fill(t, order))
            if not trials:
                return
            trials = np.array(trials)
            self.offer(trials, self.oracle(trials))
            if not self.best_loss < before:
                return


# ----------------------------------------------------------------------------- branch and bound

def _reduce(Z, F, e, A, E, tol):
    """Shrink boxes ``{S : F <= S <= Z}`` to the part that can hold a *maximal* feasible subset.

    A maximal feasible S leaves out no allowed expert that would still fit, so ``e(S) > theta`` with
    ``theta = E - min(e_k : k allowed, k not in Z)``; boxes with ``e(Z) <= theta`` are dropped, free
    experts without which ``e(S) <= theta`` are fixed in, and free experts that no longer fit next
    to the fixed ones are removed from the top vertex. Returns (Z, F, kept row indices).
    """
    rows = np.arange(Z.shape[0])
    for _ in range(8):
        eF = np.where(F, e, 0.0).sum(axis=1)
        keep = eF <= E + tol
        Z, F, eF, rows = Z[keep], F[keep], eF[keep], rows[keep]
        Z = F | (Z & (e[None, :] <= (E - eF)[:, None] + tol))
        eZ = np.where(Z, e, 0.0).sum(axis=1)
        theta = E - np.where(A[None, :] & ~Z, e, np.inf).min(axis=1)
        keep = eZ > theta - tol
        Z, F, eZ, theta, rows = Z[keep], F[keep], eZ[keep], theta[keep], rows[keep]
        forced = Z & ~F & ((eZ[:, None] - e[None, :]) <= theta[:, None] - tol)
        if not forced.any():
            break
        F = F | forced
    return Z, F, rows


def _expand(Z, F, rank, e, A, E, tol):
    """Proper child boxes of infeasible boxes ``(Z, F)`` (rows), branching in ``rank`` order.

    With the free experts of a box ordered ``i_1, i_2, ...`` by ``rank``, child j excludes ``i_j``
    and fixes ``i_1 .. i_{j-1}`` in: the children partition the box minus its top vertex, so no
    subset is covered twice (the polyblock's proper vertices ``Z - {i_j}``, without duplicates).
    Each child is then reduced by :func:`_reduce`. Returns (Z, F, parent row of each child).
    """
    free = Z & ~F
    b, p = np.nonzero(free)
    if b.size == 0:
        return Z[:0], F[:0], b
    fb, rb = free[b], rank[b]
    rp = rank[b, p][:, None]
    Fc = F[b] | (fb & (rb < rp))
    Zc = Fc | (fb & (rb > rp))
    Zc, Fc, rows = _reduce(Zc, Fc, e, A, E, tol)
    nonempty = Zc.any(axis=1)  # the empty set is never a candidate (nor passed to the loss)
    return Zc[nonempty], Fc[nonempty], b[rows][nonempty]


def _fractional_knapsack(values, e, items, cap, solution: bool = False):
    """LP relaxation of ``max sum v_k x_k  s.t.  sum e_k x_k <= cap, x in [0, 1]`` per row.

    ``values`` (m, K) >= 0, ``items`` (m, K) bool (the other columns are not items), ``cap`` (m,).
    Greedy by value per joule with one fractional item (Dantzig); ``-inf`` where ``cap < 0``.
    With ``solution=True`` also the maximiser x (m, K) (0 outside the items).
    """
    v = np.where(items, values, 0.0)
    w = np.where(items, e[None, :], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(items, np.where(w > 0, v / w, np.inf), -np.inf)
    order = np.argsort(-ratio, axis=1, kind="stable")
    vs, ws = np.take_along_axis(v, order, 1), np.take_along_axis(w, order, 1)
    before = np.cumsum(ws, axis=1) - ws
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip(np.where(ws > 0, (cap[:, None] - before) / ws, 1.0), 0.0, 1.0)
    total = np.where(cap < 0, -np.inf, (share * vs).sum(axis=1))
    if not solution:
        return total
    x = np.zeros_like(v)
    np.put_along_axis(x, order, share, 1)
    return total, np.where(items, x, 0.0)


def _convex_bound(relaxed, X, Z, F, lz, e, E, iters: int):
    """Lower bounds on ``L(S)``, ``F <= S <= Z``, ``e(S) <= E``, from a convex extension of the loss.

    ``relaxed(X) -> (values, gradients)`` is convex on ``[0, 1]^K`` and equals ``L`` on 0/1 rows, so
    at any point x of the box's LP polytope ``L(S) >= L~(x) + min_y grad.(y - x)`` (the Frank-Wolfe
    gap; the minimum is a fractional knapsack). ``iters`` Frank-Wolfe steps from the warm start
    ``X`` (a parent's point) tighten it; returns (bounds combined with ``lz`` = L(Z), last points).
    """
    free = Z & ~F
    over = subset_energy(F, e) > E  # within the search's tolerance, so no subset of the box fits
    cap = np.maximum(E - subset_energy(F, e), 0.0)
    x = np.where(F, 1.0, np.where(free, X, 0.0))
    used = (x * free * e).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(used > cap, cap / np.maximum(used, 1e-300), 1.0)
    x = np.where(free, x * scale[:, None], x)
    best = lz.copy()
    steps = np.array([1.0, 0.5, 0.25, 0.125, 0.0625, 0.0])
    for _ in range(iters):
        val, grad = relaxed(x)
        _, y = _fractional_knapsack(-grad, e, free & (grad < 0), cap, solution=True)
        y = np.where(F, 1.0, y)
        best = np.maximum(best, val + (grad * (y - x)).sum(axis=1))
        d = y - x
        trial = (x[:, None, :] + steps[None, :, None] * d[:, None, :]).reshape(-1, x.shape[1])
        tv = relaxed(np.clip(trial, 0.0, 1.0))[0].reshape(x.shape[0], steps.size)
        x = np.clip(x + steps[np.argmin(tv, axis=1)][:, None] * d, 0.0, 1.0)
    return np.where(over, np.inf, best), x


class _Marginals:
    """Marginal values at a box's two ends, for the bounds of a loss with diminishing returns.

    ``lf`` = L(F) (``inf`` for the empty F, whose loss is never asked for), ``drop[k]`` =
    L(F) - L(F + k) and ``rise[k]`` = L(Z - k) - L(Z) for the free experts k, both clipped at 0
    (exact for a monotone loss). Children of the box reuse them: their F grows and their Z shrinks,
    and with diminishing returns the marginals only shrink along the way, so the parent's are
    still valid (looser) estimates.
    """

    __slots__ = ("lf", "F", "drop", "lz", "Z", "rise")

    def __init__(self, lf, F, drop, lz, Z, rise):
        self.lf, self.F, self.drop, self.lz, self.Z, self.rise = lf, F, drop, lz, Z, rise

    @staticmethod
    def of(oracle, Z, F, lz):
        """Marginals of boxes ``(Z, F)`` (rows) with top losses ``lz``: 2 x (free experts) + 1
        evaluations per box, in one batch."""
        m, K = Z.shape
        free = Z & ~F
        b, k = np.nonzero(free)
        add = F[b].copy()
        add[np.arange(b.size), k] = True
        rem = Z[b].copy()
        rem[np.arange(b.size), k] = False
        has_f, has_rem = F.any(axis=1), rem.any(axis=1)
        vals = oracle(np.concatenate([F[has_f], add, rem[has_rem]]))
        lf = np.full(m, np.inf)
        lf[has_f] = vals[:int(has_f.sum())]
        l_add = vals[int(has_f.sum()):int(has_f.sum()) + b.size]
        l_rem = np.full(b.size, lz[b])  # Z - k empty: no estimate (0 rise)
        l_rem[has_rem] = vals[int(has_f.sum()) + b.size:]
        drop, rise = np.zeros((m, K)), np.zeros((m, K))
        finite = np.isfinite(lf[b])
        drop[b[finite], k[finite]] = np.maximum(lf[b[finite]] - l_add[finite], 0.0)
        rise[b, k] = np.maximum(l_rem - lz[b], 0.0)
        return [_Marginals(lf[i], F[i], drop[i], lz[i], Z[i], rise[i]) for i in range(m)]


def _marginal_bound(refs, Z, F, lz, e, E):
    """Lower bounds on ``L(S)``, ``F <= S <= Z``, ``e(S) <= E``, for a loss with diminishing returns.

    From the bottom: ``L(S) >= L(F') - sum_{k in S - F'} drop_k`` (F' <= F the reference's fixed
    set), the sum maximised by the knapsack LP over the free experts. From the top:
    ``L(S) >= L(Z') + sum_{k in Z' - S} rise_k`` (Z' >= Z), the experts to leave out costing at least
    the LP cover of the energy excess. Both combined with the monotone bound ``L(Z)``.
    """
    lf = np.array([r.lf for r in refs])
    Fr, Zr = np.stack([r.F for r in refs]), np.stack([r.Z for r in refs])
    drop, rise = np.stack([r.drop for r in refs]), np.stack([r.rise for r in refs])
    lzr = np.array([r.lz for r in refs])
    free = Z & ~F
    eF = subset_energy(F, e)
    eZ = subset_energy(Z, e)
    with np.errstate(invalid="ignore"):
        bottom = lf - (drop * (F & ~Fr)).sum(axis=1) - _fractional_knapsack(drop, e, free, E - eF)
    bottom = np.where(np.isfinite(lf), bottom, -np.inf)
    # cover: leave out >= eZ - E of the free experts' energy at least rise = keep <= e(free) - (eZ - E)
    free_rise = (rise * free).sum(axis=1)
    keep = _fractional_knapsack(rise, e, free, subset_energy(free, e) - (eZ - E))
    top = lzr + (rise * (Zr & ~Z)).sum(axis=1) + free_rise - keep
    return np.maximum(lz, np.maximum(bottom, top))


def _incumbents(s: "_Search", heuristics: str) -> None:
    """Feasible starting subsets for the search (see ``heuristics`` in :func:`select_subset`)."""
    oracle, e, allowed = s.oracle, s.e, s.allowed
    if heuristics == "auto":
        heuristics = "full" if int(allowed.sum()) > 24 else "greedy"
    if heuristics in ("greedy", "full"):
        cheap_first = np.argsort(np.maximum(e, 1e-12), kind="stable")
        starts = [s.greedy_add(True)]
        if heuristics == "full":
            starts += [s.greedy_add(False), s.greedy_drop()]
        for m in starts:
            if m.any():
                filled = s.fill(m, cheap_first)  # never worse for a monotone loss
                s.offer(filled[None, :], oracle(filled[None, :]))
        if heuristics == "full":
            s.local_search(cheap_first)
    if not s.best_mask.any():  # no incumbent yet: the cheapest allowed expert is feasible
        k = int(np.flatnonzero(allowed)[np.argmin(e[allowed])])
        m = np.zeros(s.K, dtype=bool)
        m[k] = True
        s.offer(m[None, :], oracle(m[None, :]))


@dataclass(slots=True)
class _Box:
    """An open box ``{S : F <= S <= Z}`` of the search: the polyblock vertex ``Z`` with the experts ``F`` fixed in.

    ``Z`` and ``F`` are kept as the oracle's hashable keys (``_Codec``). ``start`` is what refining the box's
    bound starts from when it is expanded: its parent's :class:`_Marginals` (``bounds="marginals"``), its
    parent's relaxation point (``"convex"``) or None (``"monotone"``).
    """

    bound: float      # a lower bound on the loss of every subset in the box
    top: object       # Z, encoded
    fixed: object     # F, encoded
    n_free: int       # |Z - F|: at most this many children when expanded
    top_loss: float   # L(Z)
    start: object = None


class _OpenBoxes:
    """The open boxes, least bound first (ties: the earlier box).

    The heap holds ints ``ordered(bound) << 40 | id`` (fast to compare); the boxes themselves are kept by id.
    """

    SHIFT, ID = 40, (1 << 40) - 1

    def __init__(self):
        self.heap: list[int] = []
        self.boxes: dict[int, _Box] = {}
        self.last_id = -1

    def __bool__(self) -> bool:
        return bool(self.heap)

    def push(self, boxes: list[_Box], bounds: np.ndarray) -> None:
        """Add ``boxes`` (``bounds``: their bounds as an array, ordered in one vectorised call)."""
        heap, by_id, shift, last = self.heap, self.boxes, self.SHIFT, self.last_id
        for box, o in zip(boxes, _ordered(bounds)):
            last += 1
            by_id[last] = box
            heapq.heappush(heap, (o << shift) | last)
        self.last_id = last

    def least(self) -> _Box:
        """The open box of least bound (not removed)."""
        return self.boxes[self.heap[0] & self.ID]

    def pop_below(self, cut: float, n_children: int) -> list[_Box]:
        """Remove and return the boxes of least bound, while their bound is below ``cut`` and until they have
        ``n_children`` free experts in all."""
        heap, boxes, ID = self.heap, self.boxes, self.ID
        popped, n = [], 0
        while heap and n < n_children:
            box = boxes[heap[0] & ID]
            if box.bound >= cut:
                break
            del boxes[heapq.heappop(heap) & ID]
            popped.append(box)
            n += box.n_free
        return popped

    def clear(self) -> None:
        self.heap, self.boxes = [], {}


@dataclass
class _Batch:
    """Boxes expanded together, as arrays: top vertices ``Z`` and fixed sets ``F`` (rows), ``L(Z)``, the boxes'
    bounds, and per box what refining its bound starts from (see :class:`_Box`)."""

    Z: np.ndarray
    F: np.ndarray
    top_loss: np.ndarray
    bound: np.ndarray
    starts: list

    def take(self, keep: np.ndarray) -> "_Batch":
        """The boxes where the bool array ``keep`` is True."""
        return _Batch(self.Z[keep], self.F[keep], self.top_loss[keep], self.bound[keep],
                      [r for r, k in zip(self.starts, keep) if k])


@dataclass
class _Children:
    """The child boxes of a batch (rows), with ``L(Z)`` evaluated: ``parent`` is each child's row in the batch,
    ``keys`` the encoded ``Z``, ``feasible`` whether ``Z`` itself fits the energy budget, ``bound`` the child's
    bound (its own ``L(Z)``, its parent's bound, and the marginal bound where that applies)."""

    Z: np.ndarray
    F: np.ndarray
    parent: np.ndarray
    keys: list
    top_loss: np.ndarray
    feasible: np.ndarray
    bound: np.ndarray


class _BranchAndBound:
    """Best-first search over boxes ``{S : F <= S <= Z}`` from the root box (all allowed experts).

    Each round takes the open boxes of least bound (:meth:`take`), tightens their bounds with the stronger
    ``bounds`` and drops the ones that cannot beat the incumbent (:meth:`refine`), splits them into their child
    boxes, whose top vertices are evaluated and offered as incumbents (:meth:`children`), keeps the children
    that can still beat the incumbent open (:meth:`keep_open`) and projects the best of those onto the feasible
    set (:meth:`project`). :meth:`run` repeats that until the least open bound meets the incumbent or a limit
    stops the search.
    """

    def __init__(self, s: "_Search", root_loss: float, *, eps: float, batch_size: int, rank: np.ndarray,
                 projections: int, bounds: str, relax_iters: int, tol: float):
        self.s, self.eps, self.batch_size, self.rank = s, eps, batch_size, rank
        self.projections, self.bounds, self.relax_iters, self.tol = projections, bounds, relax_iters, tol
        self.score = self._projection_scores(root_loss)
        self.open = _OpenBoxes()
        self.pruned_min = math.inf  # least bound of any part of the search space discarded by the cut
        codec, K = s.oracle.codec, s.K
        start = s.allowed.astype(float) if bounds == "convex" else None
        root = _Box(root_loss, codec.encode(s.allowed[None, :])[0], codec.encode(np.zeros((1, K), dtype=bool))[0],
                   int(s.allowed.sum()), root_loss, start)
        self.open.push([root], np.array([root_loss]))

    def _projection_scores(self, root_loss: float) -> np.ndarray:
        """Value per joule of each expert, from the leave-one-out losses at the root (zeros without projections)."""
        s = self.s
        score = np.zeros(s.K)
        if self.projections:
            loo = np.repeat(s.allowed[None, :], s.K, axis=0)
            loo[np.arange(s.K), np.arange(s.K)] = False
            idx = np.flatnonzero(s.allowed & loo.any(axis=1))
            score[idx] = (s.oracle(loo[idx]) - root_loss) / np.maximum(s.e[idx], 1e-12)
        return score

    def cut(self) -> float:
        """Boxes whose bound reaches this cannot improve the incumbent by more than ``eps``."""
        return self.s.best_loss - self.eps

    def run(self) -> tuple[float, bool]:
        """``(bound, finished)``: the certified lower bound on the optimum and whether the search ran to its end
        (False: stopped by the time or evaluation limit with boxes still open)."""
        while self.open:
            if self.open.least().bound >= self.cut() or self.s.out_of_budget():
                break
            batch = self.take()
            if batch is not None and self.bounds != "monotone":
                batch = self.refine(batch)
            children = None if batch is None else self.children(batch)
            if children is None:
                continue
            push = self.keep_open(children, batch)
            if self.projections and push.size:
                self.project(children, push)
        return self.finish()

    def take(self) -> _Batch | None:
        """The open boxes of least bound below the cut, about ``batch_size`` children's worth (None: none)."""
        popped = self.open.pop_below(self.cut(), self.batch_size)
        if not popped:
            return None
        codec = self.s.oracle.codec
        return _Batch(codec.decode([bx.top for bx in popped]), codec.decode([bx.fixed for bx in popped]),
                      np.array([bx.top_loss for bx in popped]), np.array([bx.bound for bx in popped]),
                      [bx.start for bx in popped])

    def refine(self, batch: _Batch) -> _Batch | None:
        """The batch with each box's bound refined from what it carries (its children inherit the result), less
        the boxes that cannot beat the incumbent any more (None: none is left)."""
        s = self.s
        if self.bounds == "marginals":
            starts = _Marginals.of(s.oracle, batch.Z, batch.F, batch.top_loss)
            bnd = np.maximum(batch.bound, _marginal_bound(starts, batch.Z, batch.F, batch.top_loss, s.e, s.E))
        else:
            b_own, x_own = _convex_bound(s.oracle.relaxed, np.stack(batch.starts), batch.Z, batch.F,
                                         batch.top_loss, s.e, s.E, self.relax_iters)
            bnd, starts = np.maximum(batch.bound, b_own), list(x_own)
        batch = _Batch(batch.Z, batch.F, batch.top_loss, bnd, starts)
        dead = bnd >= self.cut()
        if not dead.any():
            return batch
        self.pruned_min = min(self.pruned_min, float(bnd[dead].min()))
        return batch.take(~dead) if not dead.all() else None

    def children(self, batch: _Batch) -> _Children | None:
        """The batch's child boxes (:func:`_expand`), their top vertices evaluated and the feasible ones offered
        as incumbents (None: no child)."""
        s = self.s
        Zc, Fc, parent = _expand(batch.Z, batch.F, np.broadcast_to(self.rank, batch.Z.shape), s.e, s.allowed,
                                 s.E, self.tol)
        if Zc.shape[0] == 0:
            return None
        keys = s.oracle.codec.encode(Zc)
        vals = s.oracle(Zc, keys)
        feas = subset_energy(Zc, s.e) <= s.E
        s.offer(Zc[feas], vals[feas])
        bound = np.maximum(vals, batch.bound[parent])  # a child box lies inside its parent's
        if self.bounds == "marginals":
            inf = np.flatnonzero(~feas)
            if inf.size:
                bound[inf] = np.maximum(bound[inf], _marginal_bound(
                    [batch.starts[j] for j in parent[inf]], Zc[inf], Fc[inf], vals[inf], s.e, s.E))
        return _Children(Zc, Fc, parent, keys, vals, feas, bound)

    def keep_open(self, c: _Children, batch: _Batch) -> np.ndarray:
        """Open the infeasible children below the cut (a feasible one is its own box's best subset, already
        offered); the rest is pruned. Returns the rows of ``c`` opened."""
        cut = self.cut()
        push = np.flatnonzero(~c.feasible & (c.bound < cut))
        high = c.bound[~c.feasible & (c.bound >= cut)]
        if high.size:
            self.pruned_min = min(self.pruned_min, float(high.min()))
        if push.size:
            fkeys = self.s.oracle.codec.encode(c.F[push])
            nfree = (c.Z[push] & ~c.F[push]).sum(axis=1).tolist()
            bounds, keys, losses, starts = c.bound[push], c.keys, c.top_loss[push].tolist(), batch.starts
            self.open.push([_Box(b, keys[r], fk, nf, lz, starts[p]) for r, b, fk, nf, lz, p in
                            zip(push.tolist(), bounds.tolist(), fkeys, nfree, losses, c.parent[push].tolist())],
                           bounds)
        return push

    def project(self, c: _Children, push: np.ndarray) -> None:
        """Offer the projections onto the feasible set of the ``projections`` best children just opened."""
        best = push[np.argsort(c.bound[push], kind="stable")[:self.projections]]
        P = self.s.project(c.Z[best], c.F[best], self.score)
        if P.shape[0]:
            self.s.offer(P, self.s.oracle(P))

    def finish(self) -> tuple[float, bool]:
        """The search's certified bound and whether it finished (see :meth:`run`)."""
        open_min = self.open.least().bound if self.open else math.inf
        if self.open and open_min >= self.cut():  # finished: the rest is pruned by the cut
            self.pruned_min, open_min = min(self.pruned_min, open_min), math.inf
            self.open.clear()
        return min(self.s.best_loss, self.pruned_min, open_min), not self.open


@dataclass(frozen=True)
class _SearchOptions:
    """:func:`select_subset`'s search options, checked (see its parameters)."""

    eps: float
    time_limit: float | None
    batch_size: int
    max_evaluations: int | None
    branch_order: str
    heuristics: str
    projections: int
    bounds: str
    relax_iters: int

    @classmethod
    def checked(cls, loss, *, eps, time_limit, batch_size, max_evaluations, branch_order, heuristics,
                projections, bounds, relax_iters) -> "_SearchOptions":
        """The options, or InputError naming the first bad one."""
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise InputError(f"must be a real number, got {eps!r}", param="eps") from None
        if math.isnan(eps) or eps < 0:
            raise InputError("must be a non-negative number", param="eps")
        batch_size = check_int(batch_size, "batch_size")
        max_evaluations = check_int(max_evaluations, "max_evaluations", none=True)
        if time_limit is not None:
            time_limit = _budget(time_limit, "time_limit")
        if heuristics not in ("auto", "greedy", "full", "none"):
            raise InputError("must be 'auto', 'greedy', 'full' or 'none'", param="heuristics")
        if branch_order not in ("energy", "index"):
            raise InputError("must be 'energy' or 'index'", param="branch_order")
        if bounds not in ("monotone", "marginals", "convex"):
            raise InputError("must be 'monotone', 'marginals' or 'convex'", param="bounds")
        relax_iters = check_int(relax_iters, "relax_iters")
        if bounds == "convex" and not callable(getattr(loss, "relaxed", None)):
            raise InputError("bounds='convex' needs loss.relaxed(X) -> (values, gradients), the loss's "
                             "convex extension to [0, 1]^K (SyntheticLoss(monotone=True) has one)", param="loss")
        return cls(eps, time_limit, batch_size, max_evaluations, branch_order, heuristics, projections, bounds,
                   relax_iters)


def _branch_rank(e: np.ndarray, branch_order: str) -> np.ndarray:
    """Each expert's place in the branching order: ``"energy"``, high-energy experts first (fixing them in
    exhausts the budget fast; ties by index), or ``"index"``."""
    K = e.size
    if branch_order == "index":
        return np.arange(K)
    rank = np.empty(K, dtype=np.int64)
    rank[np.lexsort((np.arange(K), -e))] = np.arange(K)
    return rank


def select_subset(loss: LossFn, delay, energy, delay_budget, energy_budget, *, eps: float = 0.0,
                  time_limit: float | None = None, batch_size: int = 256,
                  max_evaluations: int | None = None, branch_order: str = "energy",
                  heuristics: str = "auto", projections: int = 0, available=None,
                  bounds: str = "monotone", relax_iters: int = 3) -> SubsetResult:
    """Subset Monotonic Optimisation (Alg. 2): ``min L(S)`` under the delay and energy budgets.

    Parameters
    ----------
    loss : callable mapping a bool array (m, K) to m losses; assumed monotone non-increasing.
    delay, energy : per-expert arrays (K,), finite and non-negative.
    delay_budget, energy_budget : bounds on the subset's max delay and summed energy (``inf`` = none).
    eps : stop when ``incumbent - bound <= eps``; ``eps=0`` (default) is exact for monotone losses.
    time_limit : seconds; when hit, the incumbent is returned with ``timed_out=True`` and ``bound``
        the least bound over the open boxes (still a certified lower bound on the optimum).
    batch_size : most subsets per call of ``loss`` (and about how many child boxes per step).
    max_evaluations : stop (like the time limit) once this many distinct subsets were evaluated
        (checked between batches).
    branch_order : ``"energy"`` (default): branch on high-energy experts first, so that fixing them
        in exhausts the budget fast and the children's top vertices shrink (far fewer boxes than
        ``"index"``, expert order, on the synthetic instances).
    heuristics : incumbents before the search: ``"greedy"`` (the per-joule greedy, filled up),
        ``"full"`` (also greedy by loss drop and greedy removal, then 1-swap local search),
        ``"none"``, or ``"auto"`` (default: ``"full"`` when more than 24 experts fit the budgets on
        their own, else ``"greedy"``; on small instances best-first search finds good incumbents
        itself and the extra starts mostly cost evaluations).
    projections : per step, how many of the best new infeasible vertices are projected onto the
        feasible set (drop the experts of least leave-one-out value per joule, then fill up) to
        find incumbents early; 0 turns projection off.
    available : bool (K,) or None; experts that are down (False) are never selected. Re-selection
        after a budget change or a failure is one more call (the ``dynamic`` benchmark times it).
    bounds : how a box ``{S : F <= S <= Z}`` is bounded. ``"monotone"`` (default): by ``L(Z)``, which
        needs only Theorem 2. ``"marginals"``: also by knapsack LP relaxations over the experts'
        marginal gains at both ends of the box, valid when gains diminish as the subset grows
        (``L(S) - L(S + k)`` non-increasing in S: ``L`` supermodular), as for ``-log`` of a sum of
        fixed non-negative per-expert terms; 2 x (free experts) + 1 evaluations per expanded box.
        ``"convex"``: by Frank-Wolfe on the loss's convex extension, which ``loss`` must provide as
        ``loss.relaxed(X) -> (values, gradients)`` for X in ``[0, 1]^(m, K)`` (``SyntheticLoss``
        with ``monotone=True`` does); the tightest, it certifies K = 64 in seconds. Both stronger
        bounds are certificates only if the loss has the property (the renormalised mixture of
        eq. (2) does not in general: keep ``"monotone"`` there).
    relax_iters : Frank-Wolfe steps per expanded box for ``bounds="convex"`` (warm-started from the
        parent box's point).
    """
    t0 = time.perf_counter()
    d, e, D, E = _validate(delay, energy, delay_budget, energy_budget)
    opt = _SearchOptions.checked(loss, eps=eps, time_limit=time_limit, batch_size=batch_size,
                                 max_evaluations=max_evaluations, branch_order=branch_order, heuristics=heuristics,
                                 projections=projections, bounds=bounds, relax_iters=relax_iters)
    K = d.size
    allowed = _allowed(d, e, D, E, available)
    if not allowed.any():
        return _infeasible(K, d, e, t0, "smo")
    oracle = _Oracle(loss, K, opt.batch_size)
    deadline = math.inf if opt.time_limit is None else t0 + opt.time_limit
    s = _Search(oracle, e, E, allowed, deadline, opt.max_evaluations)

    root_loss = float(oracle(allowed[None, :])[0])
    if subset_energy(allowed, e) <= E:  # everything allowed fits: by monotonicity it is optimal
        return _result(allowed, root_loss, d, e, oracle.evaluations, root_loss, t0,
                       method="smo", status="optimal")
    _incumbents(s, opt.heuristics)
    search = _BranchAndBound(s, root_loss, eps=opt.eps, batch_size=opt.batch_size,
                             rank=_branch_rank(e, opt.branch_order), projections=opt.projections,
                             bounds=opt.bounds, relax_iters=opt.relax_iters,
                             tol=1e-12 * (E + float(e[allowed].sum()) + 1.0))
    bound, finished = search.run()
    if s.stop_reason and not finished:
        status, timed_out = s.stop_reason, True
    else:
        status, timed_out = ("optimal" if bound >= s.best_loss else "eps-optimal"), False
    return _result(s.best_mask, s.best_loss, d, e, oracle.evaluations, bound, t0,
                   method="smo", status=status, timed_out=timed_out)


# ----------------------------------------------------------------------------- baselines

def exhaustive_subset(loss: LossFn, delay, energy, delay_budget, energy_budget, *,
                      batch_size: int = 4096, available=None) -> SubsetResult:
    """Reference: evaluate every non-empty feasible subset (vectorised, in batches); K <= 24.

    Only subsets of the experts that fit the budgets on their own are enumerated (any other subset
    is infeasible); ``evaluations`` is the number of feasible non-empty subsets.
    """
    t0 = time.perf_counter()
    d, e, D, E = _validate(delay, energy, delay_budget, energy_budget)
    batch_size = check_int(batch_size, "batch_size")
    K = d.size
    if K > EXHAUSTIVE_MAX_K:
        raise InputError(f"K={K} experts is too large for exhaustive search (2^K subsets; at most "
                         f"{EXHAUSTIVE_MAX_K})", param="delay")
    if not callable(loss):
        raise InputError("must be callable: bool masks (m, K) -> m losses", param="loss")
    allowed = np.flatnonzero(_allowed(d, e, D, E, available))
    n = allowed.size
    if n == 0:
        return _infeasible(K, d, e, t0, "exhaustive")
    oracle = _Oracle(loss, K, batch_size)
    best_loss, best_mask, count = math.inf, np.zeros(K, dtype=bool), 0
    total = 1 << n
    bits = np.arange(n, dtype=np.int64)
    for start in range(1, total, batch_size):
        ints = np.arange(start, min(start + batch_size, total), dtype=np.int64)
        masks = np.zeros((ints.size, K), dtype=bool)
        masks[:, allowed] = ((ints[:, None] >> bits) & 1).astype(bool)
        masks = masks[subset_energy(masks, e) <= E]
        if masks.shape[0] == 0:
            continue
        vals = oracle._call(masks)  # every subset is distinct: no memo needed
        count += masks.shape[0]
        i = int(np.argmin(vals))
        if vals[i] < best_loss:
            best_loss, best_mask = float(vals[i]), masks[i].copy()
    return _result(best_mask, best_loss, d, e, count, best_loss, t0, method="exhaustive",
                   status="optimal")


def greedy_subset(loss: LossFn, delay, energy, delay_budget, energy_budget, *,
                  batch_size: int = 256, available=None) -> SubsetResult:
    """Baseline: repeatedly add the fitting expert with the largest loss drop per joule.

    The first expert is the one with the lowest loss on its own (the empty set's loss is not used);
    it stops when no expert fits or none lowers the loss. No optimality certificate (bound -inf).
    """
    t0 = time.perf_counter()
    d, e, D, E = _validate(delay, energy, delay_budget, energy_budget)
    batch_size = check_int(batch_size, "batch_size")
    K = d.size
    allowed = _allowed(d, e, D, E, available)
    if not allowed.any():
        return _infeasible(K, d, e, t0, "greedy")
    oracle = _Oracle(loss, K, batch_size)
    s = _Search(oracle, e, E, allowed, math.inf, None)
    mask = s.greedy_add(True)
    val = float(oracle(mask[None, :])[0])
    return _result(mask, val, d, e, oracle.evaluations, -math.inf, t0, method="greedy",
                   status="heuristic")


# ----------------------------------------------------------------------------- synthetic instances

# (device, model size) -> (delay s, energy J) per prompt; after the paper's testbed (Table I):
# a fast, power-hungry RTX 4090-like server and a slow, frugal Jetson AGX Orin-like one.
DEVICE_CATALOGUE = {
    ("rtx4090", "7B"): (0.9, 24.0),
    ("rtx4090", "3B"): (0.5, 14.0),
    ("jetson-orin", "7B"): (2.4, 11.0),
    ("jetson-orin", "3B"): (1.3, 6.0),
}
# Table I mixes 2x 7B@4090, 1x 7B@Jetson, 1x 3B@4090, 4x 3B@Jetson
_CATALOGUE_MIX = [("rtx4090", "7B")] * 2 + [("jetson-orin", "7B")] + [("rtx4090", "3B")] + \
                 [("jetson-orin", "3B")] * 4


@dataclass
class SyntheticLoss:
    """Mixture cross-entropy of a synthetic expert pool: ``loss(masks (m, K)) -> (m,)``.

    ``monotone=True``: ``L(S) = mean_n -log(floor + sum_{k in S} g_nk p_nk)``, monotone
    non-increasing by construction. ``monotone=False``: the renormalised mixture of eq. (2)–(3),
    ``-log(sum_S g p / sum_S g)``, the realistic form, which need not be monotone (empty set: inf).
    """

    g: np.ndarray          # (N, K) gating weights, rows sum to 1
    p: np.ndarray          # (N, K) each expert's probability of the correct answer
    monotone: bool = True
    floor: float = 1e-6
    devices: list = field(default_factory=list)

    def __post_init__(self):
        self._gp = np.ascontiguousarray((self.g * self.p).T)
        self._g = np.ascontiguousarray(self.g.T)

    def __call__(self, masks) -> np.ndarray:
        m = np.asarray(masks, dtype=bool).astype(np.float64)
        num = m @ self._gp
        if self.monotone:
            num += self.floor
            np.log(num, out=num)
            return -num.mean(axis=1)
        den = m @ self._g
        with np.errstate(divide="ignore", invalid="ignore"):
            out = -np.log(np.maximum(num, 1e-300) / den).mean(axis=1)
        return np.where(m.any(axis=1), out, np.inf)

    def relaxed(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Convex extension of the monotone loss to fractional X (m, K): ``mean_n -log(floor + x.gp_n)``
        and its gradient; for :func:`select_subset`'s ``bounds="convex"``."""
        if not self.monotone:
            raise InputError("the renormalised loss (monotone=False) has no convex extension", param="loss")
        X = np.asarray(X, dtype=np.float64)
        num = X @ self._gp + self.floor
        val = -np.log(num).mean(axis=1)
        grad = -(1.0 / num) @ self._gp.T / num.shape[1]
        return val, grad


def synthetic_instance(K: int, seed: int = 0, n_prompts: int = 400, n_choices: int = 4, *,
                       monotone: bool = True, n_clusters: int | None = None,
                       jitter: float = 0.15, gate_sharpness: float = 12.0):
    """A seeded synthetic instance built like the real pipeline: ``(loss_fn, delay, energy)``.

    Prompts fall in ``n_clusters`` clusters (default ``K``); expert k is fine-tuned on cluster
    ``k mod n_clusters`` (and is somewhat better on one more random cluster); 7B experts are
    stronger than 3B ones. ``p[n, k]`` is expert k's probability of the correct one of
    ``n_choices`` answers, the gating ``g[n]`` a softmax that favours the experts that are good on
    the prompt's cluster. Delays and energies come from :data:`DEVICE_CATALOGUE` (mixed like the
    paper's testbed) with log-normal jitter.
    """
    K = check_int(K, "K")
    n_prompts = check_int(n_prompts, "n_prompts")
    n_choices = check_int(n_choices, "n_choices")
    C = check_int(n_clusters if n_clusters is not None else K, "n_clusters")
    rng = np.random.default_rng(seed)
    devices = [_CATALOGUE_MIX[i % len(_CATALOGUE_MIX)] for i in range(K)]
    rng.shuffle(devices)
    base = np.array([0.55 if size == "7B" else 0.45 for _, size in devices])
    chance = 1.0 / n_choices
    acc = np.tile(base[:, None], (1, C))            # (K, C) mean accuracy of k on cluster c
    acc[np.arange(K), np.arange(K) % C] += 0.3
    acc[np.arange(K), rng.integers(0, C, K)] += 0.1
    acc = np.clip(acc + rng.normal(0, 0.03, acc.shape), chance * 0.8, 0.97)
    cluster = rng.integers(0, C, n_prompts)
    mean = acc[:, cluster].T                         # (N, K)
    kappa = 6.0
    p = rng.beta(mean * kappa, (1 - mean) * kappa)
    p = np.clip(p, 1e-4, 1.0)
    logits = gate_sharpness * mean + rng.normal(0, 0.5, mean.shape)
    g = np.exp(logits - logits.max(axis=1, keepdims=True))
    g /= g.sum(axis=1, keepdims=True)
    cat = np.array([DEVICE_CATALOGUE[dv] for dv in devices])
    noise = np.exp(rng.normal(0, jitter, cat.shape))
    delay, energy = cat[:, 0] * noise[:, 0], cat[:, 1] * noise[:, 1]
    return SyntheticLoss(g=g, p=p, monotone=monotone, devices=devices), delay, energy
