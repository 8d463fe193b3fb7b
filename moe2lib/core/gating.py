"""The gating network (eq. 1), subset weights (2), Top-k (26)–(28), fusion (3) and the fused loss (13)–(15).

For multiple-choice prompts each expert k gives a distribution ``probs[n, k, :]`` over the answer
letters. The gating network maps a prompt embedding to ``g(x) = softmax(MLP(x))`` over the K experts;
a subset S re-normalises it (eq. 2, Theorem 1) and the fused distribution is ``sum_k w_k p_k`` (eq. 3).
The loss is the fused negative log-likelihood of the correct letter.

Conventions of the pure functions (numpy, vectorised):

* an **empty subset** has all-zero weights, an all-zero fused "distribution", loss ``+inf`` and
  accuracy ``nan``;
* a non-empty subset whose gating values all underflow to 0 gets uniform weights over its members;
* probabilities of the correct answer are clipped below at :data:`PROB_FLOOR` before the log, so a
  confident wrong expert costs at most ``-log(PROB_FLOOR)`` ≈ 18.4 nats per prompt instead of ``inf``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..errors import InputError, check_int
from ..infra import artifacts, parallel

__all__ = ["PROB_FLOOR", "GatingNetwork", "subset_weights", "topk_mask", "fuse", "subset_loss",
           "subset_accuracy", "fused_answer", "correct_probs", "check_inputs", "synthetic_experts"]

PROB_FLOOR = 1e-8
FORMAT = "moe2-gating/1"


# --------------------------------------------------------------------------- pure functions

def _as_mask(mask, k: int, param: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise InputError("a subset mask holds booleans (or 0/1)", param=param)
        mask = mask.astype(bool)
    if mask.ndim == 0 or mask.shape[-1] != k:
        raise InputError(f"mask has shape {mask.shape}, its last axis must be K={k}", param=param)
    return mask


def _as_gate(gate) -> np.ndarray:
    gate = np.asarray(gate, dtype=np.float64)
    if gate.ndim == 0 or not np.isfinite(gate).all() or (gate < 0).any():
        raise InputError("gating values must be a finite, non-negative array (..., K)", param="gate")
    return gate


def subset_weights(gate, mask) -> np.ndarray:
    """Eq. (2): ``w_k = g_k / sum_{j in S} g_j`` for k in S, else 0.

    ``gate`` is (K,) or (N, K); ``mask`` broadcasts against it: (K,) one subset for every prompt,
    (N, K) one subset per prompt (e.g. from :func:`topk_mask`), (m, K) m subsets of one prompt's
    (K,) gate, or (m, 1, K) m subsets of N prompts → (m, N, K). Empty subsets give zero weights.
    """
    gate = _as_gate(gate)
    mask = _as_mask(mask, gate.shape[-1])
    g = np.where(mask, gate, 0.0)
    with np.errstate(over="ignore"):
        total = g.sum(-1, keepdims=True)
    if not np.isfinite(total).all():  # finite gates such as 1e308 overflow their sum: those rows by their max
        g = g / np.where(np.isfinite(total), 1.0, g.max(-1, keepdims=True))
        total = g.sum(-1, keepdims=True)
    size = mask.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(total > 0, g / total, np.where(size > 0, mask / np.maximum(size, 1), 0.0))
    return w


def topk_mask(gate, k: int | None, mask=None) -> np.ndarray:
    """Eqs. (26)–(27): per prompt, the ``k`` members of subset ``mask`` (default: all K) with the largest
    gating values → bool, ``gate`` and ``mask`` broadcast (as in :func:`subset_weights`); ``k`` None keeps
    the whole subset.

    Ties go to the lower expert index; a prompt whose subset has fewer than ``k`` members keeps them all.
    Feed the result to :func:`subset_weights` for eq. (28).
    """
    gate = _as_gate(gate)
    mask = np.ones(gate.shape[-1], bool) if mask is None else _as_mask(mask, gate.shape[-1])
    try:
        mask = np.broadcast_to(mask, np.broadcast_shapes(mask.shape, gate.shape))
    except ValueError:
        raise InputError(f"mask {mask.shape} does not broadcast against gate {gate.shape}", param="mask") from None
    k = check_int(k, "k", none=True)
    if k is None:
        return mask.copy()
    rank = np.argsort(np.where(mask, -gate, np.inf), axis=-1, kind="stable").argsort(-1)
    return mask & (rank < k)


def fuse(weights, probs) -> np.ndarray:
    """Eq. (3): ``sum_k w[..., n, k] * probs[n, k, :]`` → (..., N, C); rows sum to 1 for non-empty subsets."""
    weights = np.asarray(weights, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or weights.shape[-2:] != probs.shape[:2]:
        raise InputError(f"weights {weights.shape} must end in (N, K) of probs {probs.shape}", param="weights")
    return np.einsum("...nk,nkc->...nc", weights, probs)


def fused_answer(gate, probs, mask=None, top_k: int | None = None) -> np.ndarray:
    """Alg. 3's answer per prompt: subset ``mask`` (default all K), its Top-k by gating value if ``top_k``,
    weights (2)/(28), fused (3)/(29), argmax letter → (N,)."""
    gate = np.atleast_2d(_as_gate(gate))
    return fuse(subset_weights(gate, topk_mask(gate, top_k, mask)), probs).argmax(-1)


def correct_probs(probs, answer) -> np.ndarray:
    """Each expert's probability of the correct answer, ``probs[n, k, answer[n]]`` → (N, K)."""
    probs = np.asarray(probs, dtype=np.float64)
    answer = np.asarray(answer)
    if probs.ndim != 3 or answer.shape != probs.shape[:1] or not np.issubdtype(answer.dtype, np.integer) \
            or ((answer < 0) | (answer >= probs.shape[2])).any():
        raise InputError(f"answer must be {probs.shape[:1]} letter indices into probs {probs.shape}", param="answer")
    return np.take_along_axis(probs, answer[:, None, None], axis=2)[..., 0]


def _masks_2d(masks, k: int):
    masks = _as_mask(masks, k, "masks")
    single = masks.ndim == 1
    if masks.ndim > 2:
        raise InputError(f"masks must be (K,) or (m, K), got {masks.shape}", param="masks")
    return np.atleast_2d(masks), single


_CONTROLLER = None


def _one_blas_thread():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def subset_loss(gate, probs, answer, masks, floor: float = PROB_FLOOR) -> np.ndarray:
    """Mean fused NLL of the correct answer, eqs. (13)–(15), for each of m subset masks → (m,).

    ``gate`` (N, K), ``probs`` (N, K, C), ``answer`` (N,), ``masks`` (m, K) or (K,) (→ a float).
    Empty subsets get ``+inf``. Two (m, K) × (K, N) products, so m=256, N=5000, K=8 takes milliseconds.
    """
    gate = _as_gate(gate)
    m2, single = _masks_2d(masks, gate.shape[-1])
    pc = correct_probs(probs, answer)
    if pc.shape != gate.shape:
        raise InputError(f"gate {gate.shape} and probs {np.shape(probs)} disagree in N or K", param="gate")
    mf = m2.astype(np.float64)
    with _one_blas_thread():  # (m, K) @ (K, N) with tiny K: threading only costs here
        num = mf @ np.ascontiguousarray((gate * pc).T)
        den = mf @ np.ascontiguousarray(gate.T)
    zero = den <= 0
    if zero.any():  # gating values underflowed: uniform weights over the subset
        uni = (mf @ pc.T) / np.maximum(mf.sum(1, keepdims=True), 1)
        num, den = np.where(zero, uni, num), np.where(zero, 1.0, den)
    fused = np.maximum(num / den, floor)
    out = -np.log(fused).mean(1)
    out[~m2.any(1)] = np.inf
    return float(out[0]) if single else out


def subset_accuracy(gate, probs, answer, masks, chunk: int = 64) -> np.ndarray:
    """Accuracy of the fused argmax (ties: lowest letter) for each of m subset masks → (m,); empty → nan."""
    gate = _as_gate(gate)
    m2, single = _masks_2d(masks, gate.shape[-1])
    probs = np.asarray(probs, dtype=np.float64)
    answer = np.asarray(answer)
    out = np.empty(len(m2))
    for s in range(0, len(m2), chunk):
        w = subset_weights(gate, m2[s:s + chunk, None, :])
        out[s:s + chunk] = (fuse(w, probs).argmax(-1) == answer).mean(-1)
    out[~m2.any(1)] = np.nan
    return float(out[0]) if single else out


# --------------------------------------------------------------------------- input checks

def check_inputs(X, probs=None, answer=None, *, x_qid=None, qid=None, path=None):
    """Validate embeddings ``X`` [N, D] and (optionally) scores ``probs`` [N, K, C], ``answer`` [N].

    Reuses :func:`moe2lib.core.scores.validate` for the probabilities (finite, non-negative, rows sum
    to 1) and, when both ``x_qid`` and ``qid`` are given, requires the same prompts in the same order.
    Raises InputError naming the parameter (and ``path``, the scores file, where known).
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"embeddings must be a non-empty (N, D) array, got shape {X.shape}", param="X")
    if not np.issubdtype(X.dtype, np.number) or not np.isfinite(X).all():
        raise InputError("embeddings must be finite numbers", param="X")
    if probs is None:
        return X.astype(np.float32), None, None
    from .scores import Scores, validate

    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise InputError(f"probs must be (N, K, C), got shape {probs.shape}", path=path, param="probs")
    n, k, _ = probs.shape
    if n != X.shape[0]:
        raise InputError(f"{n} scored prompts but {X.shape[0]} embeddings", path=path, param="probs")
    answer = np.asarray(answer)
    if answer.shape != (n,) or not np.issubdtype(answer.dtype, np.integer):
        raise InputError(f"answer must be {n} integers, got {answer.dtype} {answer.shape}", path=path, param="answer")
    if (x_qid is None) != (qid is None):
        raise InputError("give both x_qid and qid, or neither", param="qid")
    if qid is not None:
        x_qid, qid = np.asarray(x_qid).astype(str), np.asarray(qid).astype(str)
        if x_qid.shape != (X.shape[0],) or qid.shape != (n,):
            raise InputError(f"x_qid {x_qid.shape} / qid {qid.shape} must have one entry per prompt", param="qid")
        bad = np.flatnonzero(x_qid != qid)
        if bad.size:
            raise InputError(f"embeddings and scores are in a different prompt order: row {bad[0]} is "
                             f"{x_qid[bad[0]]!r} vs {qid[bad[0]]!r}", path=path, param="qid")
    validate(Scores(probs, answer, np.zeros(n), np.arange(n) if qid is None else qid,
                    np.zeros((n, k)), np.arange(k)), path)
    return X.astype(np.float32), probs.astype(np.float64), answer.astype(np.int64)


# --------------------------------------------------------------------------- the network

def _module(d: int, k: int, hidden, dropout: float):
    """Appendix Table VI: Linear→PReLU→Dropout twice; the output layer sees concat[x, h1, h2]."""
    import torch
    from torch import nn

    class GatingMLP(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [d, *hidden]
            self.hidden = nn.ModuleList(
                nn.Sequential(nn.Linear(a, b), nn.PReLU(), nn.Dropout(dropout)) for a, b in zip(dims, dims[1:]))
            self.out = nn.Linear(sum(dims), k)

        def forward(self, x):
            feats = [x]
            for layer in self.hidden:
                feats.append(layer(feats[-1]))
            return self.out(torch.cat(feats, dim=-1))

    return GatingMLP()


class GatingNetwork:
    """The gating network g(x; θ) of eq. (1), trained on the fused NLL over all K experts (Alg. 1).

    Parameters follow Appendix Table VI (values ours; the paper's were lost): ``hidden`` widths of the
    two PReLU layers, ``dropout``, AdamW (``lr``, ``weight_decay``), mini-batches of ``batch_size`` with
    ``grad_accum`` batches per step and clipping at ``max_grad_norm``, ReduceLROnPlateau (``lr_factor``,
    ``lr_patience``) on the validation loss, early stopping after ``patience`` epochs without
    improvement (best weights restored), ``val_fraction`` of the training rows held out (seeded;
    0: the training loss is monitored instead). ``history_`` holds train/validation loss and learning
    rate per epoch, ``best_epoch_`` the epoch whose weights were kept.
    Training is deterministic for a given ``seed`` and ``n_threads``.
    """

    def __init__(self, hidden=(256, 128), dropout=0.1, lr=1e-3, weight_decay=1e-2, batch_size=64, grad_accum=1,
                 max_grad_norm=1.0, max_epochs=200, patience=15, val_fraction=0.15, lr_factor=0.5, lr_patience=5,
                 seed=0, n_threads=1):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.lr_factor = lr_factor
        self.lr_patience = lr_patience
        self.seed = seed
        self.n_threads = n_threads

    _PARAMS = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "grad_accum", "max_grad_norm",
               "max_epochs", "patience", "val_fraction", "lr_factor", "lr_patience", "seed", "n_threads")

    def get_params(self) -> dict:
        return {p: (list(getattr(self, p)) if p == "hidden" else getattr(self, p)) for p in self._PARAMS}

    def _check_params(self):
        hidden = tuple(self.hidden)
        if len(hidden) < 1:
            raise InputError("needs at least one hidden layer", param="hidden")
        for h in hidden:
            check_int(h, "hidden")
        for name in ("batch_size", "grad_accum", "max_epochs", "patience", "lr_patience", "n_threads"):
            check_int(getattr(self, name), name)
        for name, lo, hi in (("dropout", 0, 1), ("val_fraction", 0, 1), ("lr_factor", 0, 1)):
            v = getattr(self, name)
            if not lo <= v < hi:
                raise InputError(f"must be in [{lo}, {hi}), got {v!r}", param=name)
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be positive, got {getattr(self, name)!r}", param=name)
        if self.weight_decay < 0:
            raise InputError(f"must be non-negative, got {self.weight_decay!r}", param="weight_decay")
        return hidden

    @staticmethod
    def _nll(logits, log_pc):
        """−log Σ_k softmax(logits)_k p_k(y|x), computed in log space; mean over the batch."""
        import torch

        return -torch.logsumexp(torch.log_softmax(logits, -1) + log_pc, dim=-1).mean()

    def fit(self, X, probs, answer, *, x_qid=None, qid=None, path=None) -> "GatingNetwork":
        """Train on embeddings ``X`` [N, D] and the experts' letter distributions ``probs`` [N, K, C]."""
        import torch

        hidden = self._check_params()
        X, probs, answer = check_inputs(X, probs, answer, x_qid=x_qid, qid=qid, path=path)
        n, k = probs.shape[:2]
        log_pc = np.log(np.maximum(correct_probs(probs, answer), PROB_FLOOR)).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(n)
        n_val = int(round(self.val_fraction * n))
        if self.val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.n_features_in_, self.n_experts_ = X.shape[1], k
        self.history_ = []
        with parallel.torch_threads(int(self.n_threads)), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = _module(X.shape[1], k, hidden, self.dropout)
            Xt, Lt = torch.from_numpy(X), torch.from_numpy(log_pc)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=self.lr_factor,
                                                               patience=self.lr_patience)
            best, best_state, stale = np.inf, copy.deepcopy(net.state_dict()), 0
            self.best_epoch_ = 0
            for epoch in range(1, int(self.max_epochs) + 1):
                net.train()
                order = train[rng.permutation(len(train))]
                batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
                total = 0.0
                opt.zero_grad()
                for b, idx in enumerate(batches, start=1):
                    idx_t = torch.from_numpy(idx)
                    loss = self._nll(net(Xt[idx_t]), Lt[idx_t])
                    total += loss.item() * len(idx)
                    # accumulation: each batch's share of its group of grad_accum batches
                    group = min(self.grad_accum, len(batches) - (b - 1) // self.grad_accum * self.grad_accum)
                    (loss / group).backward()
                    if b % self.grad_accum == 0 or b == len(batches):
                        torch.nn.utils.clip_grad_norm_(net.parameters(), self.max_grad_norm)
                        opt.step()
                        opt.zero_grad()
                net.eval()
                with torch.no_grad():
                    monitor = self._nll(net(Xt[torch.from_numpy(val)]), Lt[torch.from_numpy(val)]).item() \
                        if len(val) else None
                    train_loss = total / len(order)
                current = monitor if monitor is not None else train_loss
                self.history_.append({"epoch": epoch, "train_loss": train_loss, "val_loss": monitor,
                                      "lr": opt.param_groups[0]["lr"]})
                sched.step(current)
                if current < best - 1e-6:
                    best, best_state, stale, self.best_epoch_ = current, copy.deepcopy(net.state_dict()), 0, epoch
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
            net.load_state_dict(best_state)
            net.eval()
        self.module_ = net
        self.n_train_, self.n_val_ = len(train), len(val)
        return self

    def _check_fitted(self):
        if not hasattr(self, "module_"):
            raise InputError("the gating network is not fitted: call fit() or load() first", param="self")

    def predict_proba(self, X) -> np.ndarray:
        """Gating values g(x) [N, K] (rows sum to 1), eq. (1)."""
        import torch

        self._check_fitted()
        X, _, _ = check_inputs(X)
        if X.shape[1] != self.n_features_in_:
            raise InputError(f"embeddings have {X.shape[1]} dimensions, the network was fitted on "
                             f"{self.n_features_in_}", param="X")
        with parallel.torch_threads(int(self.n_threads)), torch.no_grad():
            return torch.softmax(self.module_(torch.from_numpy(X)).double(), -1).numpy()

    def predict(self, X, probs, mask=None, top_k: int | None = None) -> np.ndarray:
        """Fused answer (argmax letter) per prompt: subset ``mask`` (default all K), optional Top-k (26)–(29)."""
        gate = self.predict_proba(X)
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[:2] != gate.shape:
            raise InputError(f"probs {probs.shape} must be (N, K, C) with (N, K) = {gate.shape}", param="probs")
        return fused_answer(gate, probs, mask, top_k)

    def loss(self, X, probs, answer, mask=None) -> float:
        """Mean fused NLL of the correct answer over subset ``mask`` (default all K)."""
        gate = self.predict_proba(X)
        mask = np.ones(gate.shape[1], bool) if mask is None else mask
        return subset_loss(gate, probs, answer, mask)

    # ------------------------------------------------------------------ persistence (no pickle)

    @staticmethod
    def _paths(path):
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, path, **extra) -> tuple[Path, Path]:
        """Weights to ``<stem>.safetensors``, configuration and history to ``<stem>.json`` (atomic)."""
        from safetensors.torch import save_file

        self._check_fitted()
        weights, config = self._paths(path)
        state = {k: v.detach().contiguous() for k, v in self.module_.state_dict().items()}
        with artifacts.atomic_path(weights) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        artifacts.write_json(config, {
            "format": FORMAT, "params": self.get_params(), "n_features_in": self.n_features_in_,
            "n_experts": self.n_experts_, "best_epoch": self.best_epoch_, "history": self.history_,
            "weights_sha256": artifacts.file_sha256(weights), **extra})
        return weights, config

    @classmethod
    def load(cls, path) -> "GatingNetwork":
        """Inverse of :meth:`save`; ``path`` is the .safetensors, the .json or their common stem."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights, config = cls._paths(path)
        for p in (weights, config):
            if not p.exists():
                raise InputError("missing gating file (write it with GatingNetwork.save)", path=p)
        cfg = artifacts.read_json(config)
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise InputError(f"not a gating configuration (format {FORMAT!r})", path=config, param="format")
        try:
            params = {p: cfg["params"][p] for p in cls._PARAMS}
            d, k = int(cfg["n_features_in"]), int(cfg["n_experts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"incomplete gating configuration ({exc})", path=config) from None
        params["hidden"] = tuple(params["hidden"])
        self = cls(**params)
        hidden = self._check_params()
        if cfg.get("weights_sha256") not in (None, artifacts.file_sha256(weights)):
            raise InputError(f"weights do not match the sha256 recorded in {config.name}", path=weights)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"unreadable safetensors file ({exc})", path=weights) from None
        net = _module(d, k, hidden, self.dropout)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(f"weights do not match the configuration ({exc})", path=weights) from None
        net.eval()
        self.module_, self.n_features_in_, self.n_experts_ = net, d, k
        self.history_ = cfg.get("history", [])
        self.best_epoch_ = cfg.get("best_epoch")
        self.config_ = cfg
        return self

    def __repr__(self):
        return f"GatingNetwork({', '.join(f'{p}={getattr(self, p)!r}' for p in self._PARAMS)})"


# --------------------------------------------------------------------------- a known-answer case

def synthetic_experts(n: int = 400, d: int = 16, seed: int = 0, n_choices: int = 4, *, sure: float = 0.85,
                      wrong: float = 0.9):
    """Two clusters of embeddings and three experts whose best weighting is known → (X, probs, answer, cluster).

    Expert 0 is right on cluster 0 (``sure`` on the answer) and confidently wrong on cluster 1
    (``wrong`` on the next letter), expert 1 the reverse, expert 2 always uniform. Routing each cluster
    to its expert is right on every prompt; majority voting mostly is not (one right vote against a
    confident wrong one and a uniform one, which votes the first letter).
    """
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 2, n)
    centers = rng.normal(0, 1, (2, d)) * 3 / np.sqrt(d) * 2
    X = (centers[cluster] + rng.normal(0, 1, (n, d)) / np.sqrt(d)).astype(np.float32)
    answer = rng.integers(0, n_choices, n)
    eye = np.eye(n_choices)
    right = sure * eye[answer] + (1 - sure) / n_choices
    bad = wrong * eye[(answer + 1) % n_choices] + (1 - wrong) / n_choices
    probs = np.full((n, 3, n_choices), 1.0 / n_choices)
    for k in (0, 1):
        home = cluster == k
        probs[home, k] = right[home]
        probs[~home, k] = bad[~home]
    return X, probs, answer, cluster
