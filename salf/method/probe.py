"""The probe lens's arithmetic: stratified cross-fitting folds and multinomial logistic regression with
L2 (plain numpy and L-BFGS-B), so that every datum is scored by a probe that never saw it.
"""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it the probe fits are only slower
    threadpool_limits = None

from salf.errors import SalfError


def one_blas_thread() -> contextlib.AbstractContextManager:
    # Probe-sized problems (hundreds of data) are 4-10x faster on one BLAS thread: waking a thread pool
    # for every small matrix product inside L-BFGS-B costs more than the product.
    return threadpool_limits(limits=1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


def check_probe_data(labels: np.ndarray, num_classes: int, folds: int) -> None:
    if num_classes < 2:
        raise SalfError(
            f"the probe lens needs at least 2 classes in the traced data, found {num_classes}",
            "trace data with more than one label (a larger --sample-size, or a shuffled dataset)",
        )
    need = 2 * folds
    if len(labels) < need:
        raise SalfError(
            f"the probe lens with {folds} folds needs at least {need} data, got {len(labels)}",
            f"give at least {need} data with class labels (more rows in the file, and --sample-size {need} or more); "
            "from Python, TraceConfig(probe_folds=...) with fewer folds needs fewer",
        )


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index sets covering every datum, each holding about 1/k of every class."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        # Continue the round-robin across classes so small classes do not all land in fold 0.
        fold_of[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return [np.flatnonzero(fold_of == f) for f in range(k) if np.any(fold_of == f)]


def cross_fitted_probe_loss(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: list[np.ndarray], l2: float, max_iter: int
) -> np.ndarray:
    """[N] held-out CE of each datum under a probe fitted on the other folds."""
    out = np.empty(x.shape[0])
    for held in folds:
        train = np.setdiff1d(np.arange(x.shape[0]), held)
        mean = x[train].mean(axis=0)
        scale = x[train].std(axis=0)
        # Constant features (e.g. the first token before any block) carry nothing: leave them at 0.
        scale = np.where(scale > 1e-8, scale, 1.0)
        w, b = fit_probe((x[train] - mean) / scale, y[train], num_classes, l2, max_iter)
        logp = log_softmax(((x[held] - mean) / scale) @ w + b, axis=1)
        out[held] = -logp[np.arange(len(held)), y[held]]
    return out


def fit_probe(
    x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with L2 by L-BFGS-B from zeros: deterministic for given data.

    Plain numpy with an analytic gradient: on probe-sized problems autograd's per-call overhead
    costs more than the arithmetic.
    """
    n, h = x.shape
    onehot = np.eye(num_classes)[y]
    split = h * num_classes

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:split].reshape(h, num_classes), theta[split:]
        logp = log_softmax(x @ w + b, axis=1)
        loss = -(onehot * logp).sum() / n + l2 * (w * w).sum()
        g = (np.exp(logp) - onehot) / n
        return loss, np.concatenate([(x.T @ g + 2 * l2 * w).ravel(), g.sum(axis=0)])

    theta0 = np.zeros(split + num_classes)
    fitted = minimize(
        loss_and_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    return fitted.x[:split].reshape(h, num_classes), fitted.x[split:]


__all__ = ["check_probe_data", "one_blas_thread", "cross_fitted_probe_loss", "fit_probe", "stratified_folds"]
