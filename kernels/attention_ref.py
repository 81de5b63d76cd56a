"""NumPy reference for fused scaled-dot-product attention (forward + backward).

The ground truth the Triton kernels in ``kernels/attention.py`` and the numpy backend's
blocked attention (``engine/backends/numpy_attention.py``) answer to. Written for
clarity, not speed: it builds the full (T, S) score matrix per head, which they never do.

Shapes: q (B, H, T, D); k, v (B, Hkv, S, D); o (B, H, T, D); lse (B, H, T).

Grouped-query attention: with Hkv < H (H a multiple of Hkv), query head h reads K/V head
h // (H / Hkv). The reference repeats K and V to H heads (``repeat_kv_heads``) and sums
the gradients of each group back onto its K/V head (``sum_kv_groups``); the kernels never
repeat them.

NOTE: the causal mask is aligned to the bottom-right corner: query row i may attend
key j iff ``j <= i + (S - T)``. With S == T this is the usual lower triangle; with
T == 1 and S keys (a KV-cache decode step) the one query sees every key.
"""

import numpy as np

_DTYPES = (np.float32, np.float64)


def _check_inputs(q, k, v, causal, dropout_mask, dropout_p):
    """Raise ValueError unless q, k, v (and the dropout mask) are a valid attention problem."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"attention: {name} must be a numpy array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"attention: {name} must have rank 4 (B, H, T, D), got shape {x.shape}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"attention: {name} must be float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != (B, Hkv, S, D) or v.shape != k.shape or Hkv < 1 or H % Hkv:
        raise ValueError(
            f"attention: expected k and v of shape (B, Hkv, S, D) = ({B}, Hkv, S, {D}) with Hkv dividing H={H}, "
            f"matching q {q.shape}; got k {k.shape}, v {v.shape}"
        )
    if min(B, H, T, S, D) < 1:
        raise ValueError(f"attention: empty dimension in q {q.shape} / k {k.shape}")
    if causal and S < T:
        raise ValueError(f"attention: causal attention needs at least as many keys as queries, got S={S} < T={T}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is None:
        if dropout_p > 0.0:
            raise ValueError("attention: dropout_p > 0 needs a dropout_mask (B, H, T, S) of kept positions")
    else:
        if not isinstance(dropout_mask, np.ndarray) or dropout_mask.dtype != np.bool_:
            raise ValueError("attention: dropout_mask must be a bool numpy array (True = keep)")
        if dropout_mask.shape != (B, H, T, S):
            raise ValueError(f"attention: dropout_mask must have shape {(B, H, T, S)}, got {dropout_mask.shape}")
    return B, H, T, S, D


def causal_mask(T: int, S: int) -> np.ndarray:
    """(T, S) bool, True where query row i may attend key j: j <= i + (S - T)."""
    return np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)


def repeat_kv_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, Hkv, S, D) -> (B, n_heads, S, D): head h is x's head h // (n_heads / Hkv); x itself
    when Hkv = n_heads."""
    return x if x.shape[1] == n_heads else np.repeat(x, n_heads // x.shape[1], axis=1)


def sum_kv_groups(dx: np.ndarray, n_kv_heads: int) -> np.ndarray:
    """(B, H, S, D) gradients of the repeated heads -> (B, n_kv_heads, S, D), summed per group."""
    B, H, S, D = dx.shape
    if H == n_kv_heads:
        return dx
    return dx.reshape(B, n_kv_heads, H // n_kv_heads, S, D).sum(axis=2)


def _probabilities(q, k, scale, causal, lse=None):
    """P = softmax(scale * q kᵀ, masked) (B, H, T, S), and the row lse (B, H, T).

    When ``lse`` is given, P is recomputed from it as exp(S - lse), as the backward kernel does.
    """
    scores = scale * (q @ np.swapaxes(k, -1, -2))  # (B, H, T, S)
    if causal:
        scores = np.where(causal_mask(q.shape[2], k.shape[2]), scores, -np.inf)
    if lse is None:
        row_max = scores.max(axis=-1, keepdims=True)  # finite: every row sees at least one key
        lse = (row_max + np.log(np.exp(scores - row_max).sum(axis=-1, keepdims=True)))[..., 0]
    p = np.exp(scores - lse[..., None])  # masked entries: exp(-inf) = 0
    return p.astype(q.dtype, copy=False), lse.astype(q.dtype, copy=False)


def _apply_dropout(x, dropout_mask, dropout_p):
    """Zero the dropped entries of x (B, H, T, S) and scale the kept ones by 1 / (1 - p)."""
    if dropout_mask is None:
        return x
    return np.where(dropout_mask, x / x.dtype.type(1.0 - dropout_p), x.dtype.type(0.0))


def attention_forward(q, k, v, scale=None, causal=True, dropout_mask=None, dropout_p=0.0):
    """o = dropout(softmax(scale · q kᵀ + mask)) v.

    q: (B, H, T, D); k, v: (B, Hkv, S, D), all float32 or all float64 (Hkv divides H).
    scale: defaults to 1 / sqrt(D).
    causal: bottom-right aligned mask (see the module docstring); needs S >= T.
    dropout_mask: optional bool (B, H, T, S), True = keep; applied to the probabilities,
        kept entries scaled by 1 / (1 - dropout_p).
    Returns o (B, H, T, D) and lse (B, H, T), the log-sum-exp of the scaled, masked
    scores (before dropout), both in q's dtype.
    """
    D = _check_inputs(q, k, v, causal, dropout_mask, dropout_p)[-1]
    scale = 1.0 / float(np.sqrt(D)) if scale is None else float(scale)
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])  # (B, H, S, D)
    p, lse = _probabilities(q, k, scale, causal)  # (B, H, T, S), (B, H, T)
    o = _apply_dropout(p, dropout_mask, dropout_p) @ v  # (B, H, T, D)
    return o.astype(q.dtype, copy=False), lse


def attention_backward(do, q, k, v, o, lse, scale=None, causal=True, dropout_mask=None, dropout_p=0.0):
    """Gradients (dq, dk, dv) of attention_forward, given the upstream gradient do = dL/do.

    P is recomputed from the saved lse (P = exp(scale · q kᵀ − lse), masked), exactly as
    the backward kernels do. With M the dropout keep-mask and p the dropout rate:

        P_drop = P ∘ M / (1 − p)                  (the matrix forward multiplied by V)
        dV     = P_dropᵀ dO                        (S, D)
        dP_drop = dO Vᵀ                            (T, S)
        dP     = dP_drop ∘ M / (1 − p)
        Δ      = rowsum(dO ∘ O)                    (T,)   = rowsum(P ∘ dP), one value per row
        dS     = P ∘ (dP − Δ)                      softmax backward, per row
        dQ     = scale · dS K                      (T, D)
        dK     = scale · dSᵀ Q                     (S, D)

    The identity rowsum(P ∘ dP) = rowsum(dO ∘ O) holds because O = P_drop V, so Δ needs
    only O and dO (an O(T·D) product) instead of the (T, S) matrix. With grouped-query
    attention dK and dV are computed per query head and summed over each group.
    """
    D = _check_inputs(q, k, v, causal, dropout_mask, dropout_p)[-1]
    for name, x, shape in (("do", do, q.shape), ("o", o, q.shape), ("lse", lse, q.shape[:3])):
        if not isinstance(x, np.ndarray) or x.shape != shape:
            raise ValueError(f"attention_backward: {name} must be a numpy array of shape {shape}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    scale = 1.0 / float(np.sqrt(D)) if scale is None else float(scale)
    dtype = q.dtype
    do, o, lse = do.astype(dtype, copy=False), o.astype(dtype, copy=False), lse.astype(dtype, copy=False)
    n_kv_heads = k.shape[1]
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])  # (B, H, S, D)

    p, _ = _probabilities(q, k, scale, causal, lse=lse)  # (B, H, T, S)
    p_drop = _apply_dropout(p, dropout_mask, dropout_p)  # (B, H, T, S)
    dv = np.swapaxes(p_drop, -1, -2) @ do  # (B, H, S, D)
    dp = _apply_dropout(do @ np.swapaxes(v, -1, -2), dropout_mask, dropout_p)  # (B, H, T, S)
    delta = (do * o).sum(axis=-1, keepdims=True)  # (B, H, T, 1)
    ds = p * (dp - delta)  # (B, H, T, S)
    dq = dtype.type(scale) * (ds @ k)  # (B, H, T, D)
    dk = dtype.type(scale) * (np.swapaxes(ds, -1, -2) @ q)  # (B, H, S, D)
    dk, dv = sum_kv_groups(dk, n_kv_heads), sum_kv_groups(dv, n_kv_heads)  # (B, Hkv, S, D)
    return dq.astype(dtype, copy=False), dk.astype(dtype, copy=False), dv.astype(dtype, copy=False)


# The seeded pair: the same signature as the Triton launchers in kernels/attention.py,
# with the dropout mask drawn here from the seed (NumPy's generator, not the kernels'
# Philox stream: the two backends drop different entries for the same seed).


def dropout_mask(B: int, H: int, T: int, S: int, dropout_p: float, seed: int) -> np.ndarray | None:
    """The keep-mask (B, H, T, S) bool for this (dropout_p, seed); None when nothing is dropped.

    NOTE: a pure function of the seed, so the backward regenerates the forward's mask exactly."""
    if dropout_p == 0.0:
        return None
    return np.random.default_rng(seed).random((B, H, T, S), dtype=np.float32) >= dropout_p


def seeded_attention_forward(q, k, v, scale=None, causal=True, dropout_p=0.0, seed=0):
    """attention_forward with the dropout mask drawn from ``seed`` (see dropout_mask)."""
    mask = dropout_mask(*q.shape[:3], k.shape[2], dropout_p, seed)
    return attention_forward(q, k, v, scale, causal, mask, dropout_p)


def seeded_attention_backward(do, q, k, v, o, lse, scale=None, causal=True, dropout_p=0.0, seed=0):
    """attention_backward with the forward's dropout mask regenerated from ``seed``."""
    mask = dropout_mask(*q.shape[:3], k.shape[2], dropout_p, seed)
    return attention_backward(do, q, k, v, o, lse, scale, causal, mask, dropout_p)
