"""NumPy reference for the fused softmax cross-entropy.

Never builds a one-hot matrix: the target logit is gathered by index, and the
gradient subtracts 1 at the target column in place of ``softmax - onehot``.
"""

import numpy as np


def _check(logits: np.ndarray, targets: np.ndarray) -> None:
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: targets must be (N,) = {logits.shape[:1]} to match logits {logits.shape}, "
            f"got shape {targets.shape}"
        )


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """Mean negative log-likelihood over the rows whose target is not ``ignore_index``.

    logits: (N, C) float; targets: (N,) int. Returns the loss as a 0-d array.
    All rows ignored gives NaN, as torch does (0 / 0).
    """
    _check(logits, targets)
    valid = targets != ignore_index  # (N,)
    bad = valid & ((targets < 0) | (targets >= logits.shape[1]))
    if bad.any():
        raise ValueError(
            f"cross_entropy: target {int(targets[bad][0])} out of range for {logits.shape[1]} classes "
            f"(use ignore_index={ignore_index} for positions to skip)"
        )
    # NOTE: work with max-shifted logits so large logits neither overflow exp() nor lose
    # precision: nll = log(sum(exp(x - max))) - (x[target] - max).
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    log_sum = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    safe_targets = np.where(valid, targets, 0)
    target_shifted = shifted[np.arange(len(targets)), safe_targets]  # (N,)
    nll = np.where(valid, log_sum - target_shifted, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(nll.sum() / valid.sum(), dtype=logits.dtype)


def cross_entropy_backward(
    dloss: np.ndarray, logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100
) -> np.ndarray:
    """d loss / d logits = (softmax(logits) - onehot(target)) * dloss / n_valid on valid rows, 0 elsewhere.

    NOTE: softmax is recomputed from the max-shifted logits rather than exp(logits - lse):
    in float32 the lse of logits near 3e4 has an ulp of 2e-3, which would leak into every
    probability."""
    _check(logits, targets)
    valid = targets != ignore_index  # (N,)
    n_valid = max(int(valid.sum()), 1)
    dlogits = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, C)
    dlogits /= dlogits.sum(axis=1, keepdims=True)  # softmax
    rows = np.nonzero(valid)[0]
    dlogits[rows, targets[rows]] -= 1.0
    dlogits *= (np.asarray(dloss, dtype=logits.dtype) / n_valid) * valid[:, None]
    return dlogits.astype(logits.dtype, copy=False)
