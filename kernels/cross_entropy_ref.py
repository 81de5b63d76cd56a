"""NumPy reference for softmax cross-entropy over vocabulary rows (twin of ``kernels/cross_entropy.py``).

Per row i with target t_i, m_i = max_j x_ij and log_sum_i = log sum_j exp(x_ij - m_i):

    nll_i      = log_sum_i + m_i - x_i,t_i             (0 where t_i == ignore_index)
    dlogits_ij = dnll_i * (softmax(x_i)_j - [j == t_i])    (0 on ignored rows)

The forward returns nll per row plus (m, log_sum) for the backward; the mean over the
non-ignored rows is the caller's (``engine.functional``), which also lets a chunked
caller normalise by the total count. Never builds a one-hot matrix: the target logit is
gathered by index and 1 is subtracted at the target column.

NOTE: the backward takes m and log_sum rather than lse = m + log_sum: in float32 the
lse of logits near 3e4 has an ulp of 2e-3, which would leak into every probability;
exp((x - m) - log_sum) keeps x - m exact.
"""

import numpy as np


def _check(logits: np.ndarray, targets: np.ndarray, ignore_index: int) -> None:
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: targets must be (N,) = {logits.shape[:1]} to match logits {logits.shape}, "
            f"got shape {targets.shape}"
        )
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
    if bad.any():
        raise ValueError(
            f"cross_entropy: target {int(targets[bad][0])} out of range for {logits.shape[1]} classes "
            f"(use ignore_index={ignore_index} for positions to skip)"
        )


def cross_entropy_forward(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits (N, C) float, targets (N,) int -> nll (N,), row_max (N,), log_sum (N,), all in logits' dtype."""
    _check(logits, targets, ignore_index)
    valid = targets != ignore_index  # (N,)
    row_max = logits.max(axis=1)  # (N,)
    shifted = logits - row_max[:, None]  # (N, C)
    log_sum = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    target_shifted = shifted[np.arange(len(targets)), np.where(valid, targets, 0)]  # (N,)
    nll = np.where(valid, log_sum - target_shifted, 0).astype(logits.dtype, copy=False)
    return nll, row_max, log_sum


def cross_entropy_backward(
    dnll: np.ndarray,
    logits: np.ndarray,
    targets: np.ndarray,
    row_max: np.ndarray,
    log_sum: np.ndarray,
    ignore_index: int = -100,
    inplace: bool = False,
) -> np.ndarray:
    """dnll (N,) upstream gradient of each row's nll -> dlogits (N, C) in logits' dtype.

    ``inplace=True`` writes the gradient over ``logits`` (and returns it): for a caller
    that no longer needs the logits, such as a chunk of ``linear_cross_entropy``."""
    _check(logits, targets, ignore_index)
    valid = targets != ignore_index  # (N,)
    out = logits if inplace else np.empty_like(logits)
    np.subtract(logits, row_max[:, None], out=out)
    out -= log_sum[:, None]
    np.exp(out, out=out)  # softmax
    rows = np.nonzero(valid)[0]
    out[rows, targets[rows]] -= 1.0
    out *= np.where(valid, dnll, 0).astype(logits.dtype, copy=False)[:, None]
    return out


def cross_entropy_loss_and_grad(
    logits: np.ndarray, targets: np.ndarray, dnll: np.ndarray, ignore_index: int = -100
) -> np.ndarray:
    """The forward and the in-place backward at once, for a caller that knows dnll (N,)
    before the loss and needs the logits no more (a chunk of ``linear_cross_entropy``):
    returns nll (N,) and leaves dlogits in ``logits``."""
    nll, row_max, log_sum = cross_entropy_forward(logits, targets, ignore_index)
    cross_entropy_backward(dnll, logits, targets, row_max, log_sum, ignore_index, inplace=True)
    return nll
