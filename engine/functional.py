"""Fused and composite neural-network ops.

Each fused op (``gelu``, ``bias_gelu``, ``layer_norm``, ``rms_norm``, ``swiglu``, ``rope``,
``attention``, ``cross_entropy``, ``linear_cross_entropy``) is one Function whose forward/backward call
the active backend's kernel pair (``get_backend().kernels``): the NumPy references on the
numpy backend, the Triton kernels on the triton backend. ``linear`` and ``embedding`` are
single Functions too, because their gradients are one matmul / one scatter-add each.
"""

from __future__ import annotations

import math
from typing import Any

from engine.amp import autocast_dtype
from engine.backends import get_backend
from engine.tensor import Function, ScatteredGrad, Tensor, as_tensor, is_grad_enabled


class _Linear(Function):
    # NOTE: (..., in) inputs are flattened to (N, in) so each product is one 2-D BLAS call.
    def forward(self, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"linear: input shape {tuple(x.shape)} does not match weight shape {tuple(weight.shape)}: "
                f"last dim {x.shape[-1]} != in_features {weight.shape[1]}"
            )
        backend = get_backend()
        x2 = x.reshape((-1, x.shape[-1]))  # (N, in)
        self.save_for_backward(x2, weight)
        self.in_shape = tuple(x.shape)
        out = backend.matmul(x2, backend.transpose(weight, (1, 0)))  # (N, out)
        if bias is not None:
            out += bias
        return out.reshape(self.in_shape[:-1] + (weight.shape[0],))  # (..., out)

    def backward(self, g):
        x2, weight = self.saved
        backend = get_backend()
        g2 = g.reshape((-1, g.shape[-1]))  # (N, out)
        gx = backend.matmul(g2, weight).reshape(self.in_shape) if self.needs_input_grad[0] else None  # (..., in)
        gw = backend.matmul(backend.transpose(g2, (1, 0)), x2) if self.needs_input_grad[1] else None  # (out, in)
        gb = backend.sum(g2, axis=0) if len(self.parents) > 2 and self.needs_input_grad[2] else None  # (out,)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias, with weight (out_features, in_features) as in torch.

    Under ``engine.autocast`` the inputs are cast (differentiably) to the autocast dtype,
    so the matmul and everything fed by its output run in that precision."""
    dtype = autocast_dtype()
    if dtype is not None:
        x, weight = x.astype(dtype), weight.astype(dtype)
        bias = None if bias is None else bias.astype(dtype)
    return _Linear.apply(x, weight) if bias is None else _Linear.apply(x, weight, bias)


class _Embedding(Function):
    def forward(self, weight, ids):
        if get_backend().is_float(ids):
            raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        self.ids, self.num = ids, weight.shape[0]
        return weight[ids]  # (..., D)

    def backward(self, g):
        dim = g.shape[-1]
        return ScatteredGrad((self.num, dim), self.ids.reshape(-1), g.reshape((-1, dim))), None


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ``ids`` of any shape."""
    ids = as_tensor(ids)
    if ids.size and (int(ids.data.min()) < 0 or int(ids.data.max()) >= weight.shape[0]):
        raise IndexError(
            f"embedding: ids must lie in [0, {weight.shape[0]}), got min {int(ids.data.min())} "
            f"max {int(ids.data.max())}"
        )
    return _Embedding.apply(weight, ids)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); identity in eval.

    The mask comes from the engine's generator (``engine.manual_seed``)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    backend = get_backend()
    keep = backend.rand(x.shape, x.dtype) >= p
    scale = backend.astype(keep, x.dtype) * (1.0 / (1.0 - p))
    return x * Tensor(scale)


class _Gelu(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_backend().kernels.gelu_forward(x)

    def backward(self, g):
        (x,) = self.saved
        return (get_backend().kernels.gelu_backward(g, x),)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (as GPT-2): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return _Gelu.apply(x)


class _BiasGelu(Function):
    def forward(self, x, bias):
        if bias.shape != x.shape[-1:]:
            raise ValueError(
                f"bias_gelu: bias shape {tuple(bias.shape)} must be ({x.shape[-1]},) for input {tuple(x.shape)}"
            )
        self.save_for_backward(x, bias)
        return get_backend().kernels.bias_gelu_forward(x, bias)

    def backward(self, g):
        x, bias = self.saved
        return get_backend().kernels.bias_gelu_backward(g, x, bias)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu(x + bias) in one fused op; bias (N,) broadcasts over the last dim."""
    return _BiasGelu.apply(x, bias)


class _LayerNorm(Function):
    def forward(self, x, weight, bias, eps: float):
        n = x.shape[-1]
        if weight.shape != (n,) or bias.shape != (n,):
            raise ValueError(
                f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({n},) "
                f"for input {tuple(x.shape)}"
            )
        y, mean, rstd = get_backend().kernels.layer_norm_forward(x, weight, bias, eps)
        self.save_for_backward(x, weight, mean, rstd)
        return y

    def backward(self, g):
        x, weight, mean, rstd = self.saved
        return get_backend().kernels.layer_norm_backward(g, x, weight, mean, rstd)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise over the last dim (population variance), then scale and shift."""
    return _LayerNorm.apply(x, weight, bias, eps=eps)


class _RMSNorm(Function):
    def forward(self, x, weight, eps: float):
        if weight.shape != x.shape[-1:]:
            raise ValueError(
                f"rms_norm: weight {tuple(weight.shape)} must be ({x.shape[-1]},) for input {tuple(x.shape)}"
            )
        y, rstd = get_backend().kernels.rms_norm_forward(x, weight, eps)
        self.save_for_backward(x, weight, rstd)
        return y

    def backward(self, g):
        x, weight, rstd = self.saved
        return get_backend().kernels.rms_norm_backward(g, x, weight, rstd)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim, for any leading shape (Llama's and
    Qwen3's norm; on (B, T, H, D) with a (D,) weight, Qwen3's per-head q/k norm)."""
    return _RMSNorm.apply(x, weight, eps=eps)


class _SwiGLU(Function):
    def forward(self, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        self.save_for_backward(gate, up)
        return get_backend().kernels.swiglu_forward(gate, up)

    def backward(self, g):
        gate, up = self.saved
        return get_backend().kernels.swiglu_backward(g, gate, up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up in one fused op (the gated MLP of Llama and Qwen3)."""
    return _SwiGLU.apply(gate, up)


class _Rope(Function):
    def forward(self, x, cos, sin, offset: int):
        self.tables = (cos, sin, offset)
        return get_backend().kernels.rope_forward(x, cos, sin, offset)

    def backward(self, g):
        return get_backend().kernels.rope_backward(g, *self.tables), None, None


def rope(x: Tensor, cos: Any, sin: Any, offset: int = 0) -> Tensor:
    """Rotary position embedding ("rotate half" layout) of x (B, H, T, D).

    cos, sin (P, D/2) are the tables of positions 0 … P-1 (no gradient flows into them);
    row t of x sits at position ``offset + t`` (``offset`` = tokens already in a KV cache).
    x may be a transposed view such as ``q.reshape(B, T, H, D).transpose(1, 2)``: the
    triton kernel reads it in place. Returns a contiguous (B, H, T, D)."""
    return _Rope.apply(x, cos, sin, offset=int(offset))


class _Attention(Function):
    def forward(self, q, k, v, scale: float, causal: bool, dropout_p: float, seed: int):
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(
                "attention: q, k, v must be (B, H, T, D), got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        self.args = (scale, causal, dropout_p, seed)
        o, lse = get_backend().kernels.attention_forward(q, k, v, *self.args)
        self.save_for_backward(q, k, v, o, lse)
        return o

    def backward(self, g):
        q, k, v, o, lse = self.saved
        return get_backend().kernels.attention_backward(g, q, k, v, o, lse, *self.args)


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None
) -> Tensor:
    """Fused scaled-dot-product attention on (B, H, T, D) queries and (B, Hkv, S, D) keys/values.

    Grouped-query attention when Hkv < H (H a multiple of Hkv): query head h reads K/V
    head h // (H / Hkv), without repeating K and V; their gradients sum over each group.

    Causal masking is bottom-right aligned (query i sees keys j ≤ i + S − T), so a KV-cache
    decode step with T = 1 sees every cached key. ``dropout_p`` drops attention
    probabilities with a mask drawn from the engine's generator."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = get_backend().randint(2**31 - 1) if dropout_p > 0 else 0
    return _Attention.apply(q, k, v, scale=scale, causal=causal, dropout_p=dropout_p, seed=seed)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """Causal ``attention``: each query sees itself and the keys before it."""
    return attention(q, k, v, causal=True, dropout_p=dropout_p, scale=scale)


def _count_valid(targets: Any, ignore_index: int) -> int:
    """How many targets the mean divides by; at least 1, so all-ignored gives a 0 loss, not NaN."""
    return max(int((targets != ignore_index).sum()), 1)


def _check_targets(op: str, targets: Tensor, inputs: Tensor) -> None:
    if get_backend().is_float(targets.data):
        raise TypeError(f"{op}: targets must be integers, got dtype {targets.dtype}")
    if inputs.shape[:-1] != targets.shape:
        raise ValueError(f"{op}: {inputs.shape} needs targets of shape {inputs.shape[:-1]}, got {targets.shape}")


class _CrossEntropy(Function):
    def forward(self, logits, targets, ignore_index: int):
        nll, row_max, log_sum = get_backend().kernels.cross_entropy_forward(logits, targets, ignore_index)  # (N,) each
        self.ignore_index, self.n_valid = ignore_index, _count_valid(targets, ignore_index)
        self.save_for_backward(logits, targets, row_max, log_sum)
        # NOTE: the loss has nll's dtype (fp32 for 16-bit logits on the triton backend).
        return get_backend().sum(nll) / self.n_valid

    def backward(self, g):
        logits, targets, row_max, log_sum = self.saved
        backend = get_backend()
        dnll = backend.broadcast_to(g / self.n_valid, targets.shape)  # (N,) ignored rows are zeroed by the kernel
        return backend.kernels.cross_entropy_backward(dnll, logits, targets, row_max, log_sum, self.ignore_index), None


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``logits`` (..., C) against integer ``targets`` (...).

    Positions whose target is ``ignore_index`` count neither in the loss nor the mean; when
    every position is ignored the loss is 0 (with zero gradients). Stable for large logits
    (log-sum-exp with the max subtracted); no one-hot matrix."""
    targets = as_tensor(targets)
    _check_targets("cross_entropy", targets, logits)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, C)
    return _CrossEntropy.apply(flat_logits, targets.reshape(-1), ignore_index=ignore_index)


# linear_cross_entropy: logits per chunk (512 MiB in fp32: 2670 rows of GPT-2's vocabulary, so a
# 2x1024 batch is one chunk).
# NOTE: not smaller: each chunk's three products read all of the (V, E) weight again (on each
# thread), and dW += dlogitsᵀ x has only chunk-many terms per output element, so it is bound by
# writing the (V, E) product; on the 2-core VM, 2048 rows in one chunk took 0.935 of the time of
# three 683-row chunks (median of 12 alternating pairs, 0.85-1.03), 1024 rows in one 0.964 of two.
# Chunks of 166 rows made the head's products 4.4x slower than one 2048-row product.
# At N = 8192 (four chunks) the loss step's peak is 1003 MB (tracemalloc; 546 MB with 911-row
# chunks, 4941 MB unfused).
CHUNK_ELEMENTS = 2**27


def balanced_chunk_rows(rows: int, most: int) -> int:
    """Rows per chunk for `rows` rows in as few chunks of at most `most` rows as can hold them, all
    about the same size: a small last chunk costs nearly a full one (its dW product still writes
    all of (V, E)). On the 2-core CPU, 1024 rows as 1001 + 23 spent 100 ms on the 23."""
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


def _accumulate(total: Any, part: Any, dtype: Any) -> Any:
    """total + part in dtype, reusing total's buffer (part's, as total, on the first call)."""
    backend = get_backend()
    if total is None:
        return backend.astype(part, dtype)
    backend.add_(total, part)  # on all cores: a (V, E) sum is 154 MB each way for GPT-2's head
    return total


class _LinearCrossEntropy(Function):
    # NOTE: the gradients are computed in forward, chunk by chunk, while each chunk's logits
    # exist (then overwritten in place by their gradient); backward only scales them by the
    # upstream gradient. So the (N, V) logits never exist, in forward or in backward.
    def forward(self, x, weight, targets, bias=None, ignore_index: int = -100, chunk_rows: int = 1):
        backend = get_backend()
        kernels = backend.kernels
        n_valid = _count_valid(targets, ignore_index)
        wants = self.needs_input_grad if is_grad_enabled() else (False,) * len(self.needs_input_grad)
        want_dx, want_dw = wants[0], wants[1]
        want_db = bias is not None and wants[3]
        exact = (backend.dtype("float32"), backend.dtype("float64"))
        acc_dtype = weight.dtype if weight.dtype in exact else backend.dtype("float32")  # 16-bit dW sums in fp32
        dx = backend.zeros(x.shape, x.dtype) if want_dx else None  # (N, E)
        dw = db = None  # (V, E), (V,): made from the first chunk's product, not zeros plus it
        weight_t = backend.transpose(weight, (1, 0))  # (E, V)
        total = 0.0
        for start in range(0, x.shape[0], chunk_rows):
            stop = start + chunk_rows
            xc, tc = x[start:stop], targets[start:stop]  # (C, E), (C,)
            logits = backend.matmul(xc, weight_t)  # (C, V)
            if bias is not None:
                logits += bias
            if not (want_dx or want_dw or want_db):
                total = total + backend.sum(kernels.cross_entropy_forward(logits, tc, ignore_index)[0])
                continue
            dnll = backend.full(tc.shape, 1.0 / n_valid, acc_dtype)  # (C,) d mean / d nll
            total = total + backend.sum(kernels.cross_entropy_loss_and_grad(logits, tc, dnll, ignore_index))
            dlogits = logits  # (C, V): overwritten by the loss's gradient
            if want_dx:
                dx[start:stop] = backend.matmul(dlogits, weight)  # (C, E)
            if want_dw:
                dw = _accumulate(dw, backend.matmul(backend.transpose(dlogits, (1, 0)), xc), acc_dtype)
            if want_db:
                db = _accumulate(db, backend.sum(dlogits, axis=0), acc_dtype)
        if want_dw and dw is None:  # no rows at all
            dw = backend.zeros(weight.shape, acc_dtype)
        if want_db and db is None:
            db = backend.zeros(weight.shape[:1], acc_dtype)
        self.grads = (dx, dw, db)
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n_valid

    def backward(self, g):
        dx, dw, db = self.grads
        backend = get_backend()
        w_dtype, b_dtype = self.dtypes
        if bool(g == 1):  # loss.backward(): hand the gradients on as they are (no (V, E) product)
            dw = None if dw is None else backend.astype(dw, w_dtype)
            db = None if db is None else backend.astype(db, b_dtype)
            return (dx, dw, None) if len(self.parents) == 3 else (dx, dw, None, db)
        dx = None if dx is None else dx * backend.astype(g, dx.dtype)
        dw = None if dw is None else backend.astype(dw * backend.astype(g, dw.dtype), w_dtype)
        db = None if db is None else backend.astype(db * backend.astype(g, db.dtype), b_dtype)
        return (dx, dw, None) if len(self.parents) == 3 else (dx, dw, None, db)


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Any,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``cross_entropy(linear(x, weight, bias), targets, ignore_index)`` without the logits.

    x (..., E), weight (V, E), bias (V,), targets (...). Walks the N = prod(...) rows in
    chunks of ``chunk_rows`` (default: equal chunks, as few as keep each within
    ``CHUNK_ELEMENTS`` logits): each chunk's logits, loss and gradients are computed and the
    logits dropped, so the (N, V) logits of the unfused path never exist; dx and dW
    accumulate over the chunks.
    Casts like ``linear`` under ``engine.autocast``."""
    targets = as_tensor(targets)
    _check_targets("linear_cross_entropy", targets, x)
    if x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(
            f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)} do not fit: expected (..., E), (V, E) and (V,)"
        )
    if chunk_rows is None:
        chunk_rows = balanced_chunk_rows(math.prod(x.shape[:-1]), max(1, CHUNK_ELEMENTS // weight.shape[0]))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    dtype = autocast_dtype()
    if dtype is not None:
        x, weight = x.astype(dtype), weight.astype(dtype)
        bias = None if bias is None else bias.astype(dtype)
    inputs = (x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1)) + (() if bias is None else (bias,))
    return _LinearCrossEntropy.apply(*inputs, ignore_index=ignore_index, chunk_rows=chunk_rows)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.softmax(axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.log_softmax(axis)
