"""Blocked ("flash") attention for the numpy backend: the same results as
``kernels/attention_ref.py``, in memory linear in T.

Queries go in blocks of rows. A causal block multiplies only against the keys it can
see (the masked half is never computed), takes its softmax there, and keeps one
log-sum-exp per row; backward recomputes each block's probabilities from that lse
instead of keeping a (T, S) matrix. Heads are split across the backend's threads, one
BLAS thread each.

Shapes: q (B, H, T, D); k, v (B, Hkv, S, D); o (B, H, T, D); lse (B, H, T). The causal
mask is bottom-right aligned as in the reference: row i sees key j iff j <= i + (S - T).
Grouped-query K/V heads (Hkv < H) are repeated to H heads on entry and their gradients
summed per group on exit, as the reference does (the Triton kernels never repeat them).

The dropout keep-mask is the reference's draw, ``default_rng(seed).random((B, H, T, S),
float32) >= p``, produced block by block: each block jumps the generator to its own
place in that stream, so forward and backward draw only the rows they work on.
"""

from __future__ import annotations

import math

import numpy as np

from engine.backends.numpy_threads import one_blas_thread, parallel_ranges
from kernels.attention_ref import _check_inputs, repeat_kv_heads, sum_kv_groups

BLOCK_ROWS = 128  # query rows per block: the diagonal block computes bq²/2 masked scores it discards
GROUP_FLOATS = 1 << 17  # scores per group of heads worked on together (512 KiB in float32: cache-sized)


def _plan(T: int, S: int) -> tuple[int, int]:
    """(query rows per block, heads per group)."""
    bq = min(T, BLOCK_ROWS)
    return bq, max(1, GROUP_FLOATS // (bq * S))


def _keep_mask(seed: int, p: float, T: int, S: int, t0: int, t1: int, kend: int, h0: int,
               h1: int) -> np.ndarray:
    """(h1 - h0, t1 - t0, kend) bool: rows t0..t1 and keys < kend of flat heads h0..h1 of the
    reference's keep-mask, drawn from the same stream."""
    # NOTE: Generator.random(float32) makes each draw from the next 32 bits u of PCG64 as
    # (u >> 8) · 2⁻²⁴, and the comparison is in float32, so draw >= p ⟺ u >= ceil(float32(p)·2²⁴)·2⁸:
    # the raw bits give the same mask without making the floats (twice as fast). PCG64 makes
    # one 64-bit output per two 32-bit draws, low half first: we jump to the pair holding
    # `start` and drop the first draw when `start` is odd.
    threshold = np.uint32(math.ceil(float(np.float32(p)) * 2**24) << 8)
    out = np.empty((h1 - h0, t1 - t0, kend), dtype=np.bool_)
    n = (t1 - t0) * S
    for i, h in enumerate(range(h0, h1)):
        start = (h * T + t0) * S  # position of (h, t0, 0) in the stream of 32-bit draws
        bits = np.random.PCG64(seed).advance(start // 2).random_raw((start % 2 + n + 1) // 2)  # (pairs,) uint64
        draws = bits.astype("<u8", copy=False).view("<u4")[start % 2: start % 2 + n]  # (n,) low halves first
        np.greater_equal(draws.reshape(t1 - t0, S)[:, :kend], threshold, out=out[i])
    return out


class _Problem:
    """Flattened (B·H, T, D) views and the constants every block needs."""

    def __init__(self, q, k, v, scale, causal, dropout_p, seed):
        B, H, T, S, D = _check_inputs(q, k, v, causal, None, 0.0)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
        self.dtype = q.dtype
        scale = 1.0 / np.sqrt(D) if scale is None else scale
        # NOTE: the scale goes on q (T·D products) rather than on each block's scores (T·S)
        self.q = (q * q.dtype.type(scale)).reshape(B * H, T, D)  # (BH, T, D), scaled
        self.k, self.v = (np.ascontiguousarray(x).reshape(B * H, S, D) for x in (k, v))  # (BH, S, D)
        # NOTE: dropout's 1 / (1 - p) goes on v (S·D values) rather than on each block's probabilities
        self.v_kept = self.v / self.dtype.type(1.0 - dropout_p) if dropout_p else self.v  # (BH, S, D)
        self.B, self.H, self.T, self.S, self.D = B, H, T, S, D
        self.scale = self.dtype.type(scale)
        self.causal, self.dropout_p, self.seed = causal, dropout_p, seed
        self.bq, self.group = _plan(T, S)
        # -inf above the diagonal of a block's last bq keys (the only keys it masks)
        self.upper = np.triu(np.full((self.bq, self.bq), -np.inf, dtype=self.dtype), 1)

    def blocks(self):
        """(t0, t1, kend): query rows [t0, t1) see keys [0, kend)."""
        for t0 in range(0, self.T, self.bq):
            t1 = min(t0 + self.bq, self.T)
            yield t0, t1, (t1 + self.S - self.T) if self.causal else self.S

    def scores(self, h0, h1, t0, t1, kend):
        """scale · q kᵀ of one block, masked: (heads, t1 - t0, kend)."""
        s = np.matmul(self.q[h0:h1, t0:t1], self.k[h0:h1, :kend].swapaxes(-1, -2))  # (n, bq, kend)
        if self.causal:
            rows = t1 - t0
            s[:, :, kend - rows:] += self.upper[:rows, :rows]
        return s

    def keep(self, h0, h1, t0, t1, kend):
        """The block's dropout keep-mask (n, bq, kend), or None without dropout."""
        if self.dropout_p == 0.0:
            return None
        return _keep_mask(self.seed, self.dropout_p, self.T, self.S, t0, t1, kend, h0, h1)

    def split(self, body):
        """body(h0, h1) over groups of heads, the groups shared among the threads."""
        n = self.B * self.H

        def part(lo, hi):
            for h0 in range(lo, hi, self.group):
                body(h0, min(h0 + self.group, hi))

        with one_blas_thread():
            parallel_ranges(n, part)


def attention_forward(q, k, v, scale=None, causal=True, dropout_p=0.0, seed=0):
    """o = dropout(softmax(scale · q kᵀ + mask)) v and the rows' lse; see the module docstring."""
    _check_inputs(q, k, v, causal, None, 0.0)
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])  # (B, H, S, D)
    pb = _Problem(q, k, v, scale, causal, dropout_p, seed)
    o = np.empty_like(pb.q)  # (BH, T, D)
    lse = np.empty(pb.q.shape[:2], dtype=pb.dtype)  # (BH, T)

    def body(h0, h1):
        for t0, t1, kend in pb.blocks():
            s = pb.scores(h0, h1, t0, t1, kend)  # (n, bq, kend)
            row_max = s.max(axis=-1, keepdims=True)  # (n, bq, 1): finite, every row sees a key
            s -= row_max
            np.exp(s, out=s)
            total = s.sum(axis=-1, keepdims=True)  # (n, bq, 1)
            lse[h0:h1, t0:t1] = (row_max + np.log(total))[..., 0]
            keep = pb.keep(h0, h1, t0, t1, kend)
            if keep is not None:
                s *= keep  # the scale 1 / (1 - p) is in v_kept
            out = o[h0:h1, t0:t1]  # (n, bq, D)
            np.matmul(s, pb.v_kept[h0:h1, :kend], out=out)
            out /= total  # softmax's division on the (bq, D) output, not on the (bq, kend) scores

    pb.split(body)
    return o.reshape(q.shape), lse.reshape(q.shape[:3])


def attention_backward(do, q, k, v, o, lse, scale=None, causal=True, dropout_p=0.0, seed=0):
    """(dq, dk, dv) of attention_forward, each block's probabilities recomputed from lse
    (the formulas are in kernels/attention_ref.attention_backward)."""
    _check_inputs(q, k, v, causal, None, 0.0)
    n_kv_heads = k.shape[1]
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])  # (B, H, S, D)
    pb = _Problem(q, k, v, scale, causal, dropout_p, seed)
    flat = (pb.B * pb.H, pb.T)
    do = np.ascontiguousarray(do, dtype=pb.dtype).reshape(flat + (pb.D,))  # (BH, T, D)
    lse = np.asarray(lse, dtype=pb.dtype).reshape(flat + (1,))  # (BH, T, 1)
    delta = np.einsum("ntd,ntd->nt", do, np.asarray(o, dtype=pb.dtype).reshape(do.shape))[..., None]  # (BH, T, 1)
    dq = np.empty_like(pb.q)  # (BH, T, D)
    dk = np.zeros_like(pb.k)  # (BH, S, D)
    dv = np.zeros_like(pb.v)  # (BH, S, D)

    def body(h0, h1):
        for t0, t1, kend in pb.blocks():
            p = pb.scores(h0, h1, t0, t1, kend)  # (n, bq, kend)
            p -= lse[h0:h1, t0:t1]
            np.exp(p, out=p)
            do_blk = do[h0:h1, t0:t1]  # (n, bq, D)
            keep = pb.keep(h0, h1, t0, t1, kend)
            p_kept = p if keep is None else p * keep  # (n, bq, kend); 1 / (1 - p) is applied to dv below
            dv[h0:h1, :kend] += np.matmul(p_kept.swapaxes(-1, -2), do_blk)
            dp = np.matmul(do_blk, pb.v_kept[h0:h1, :kend].swapaxes(-1, -2))  # (n, bq, kend)
            if keep is not None:
                dp *= keep
            dp -= delta[h0:h1, t0:t1]
            dp *= p  # dS
            np.matmul(dp, pb.k[h0:h1, :kend], out=dq[h0:h1, t0:t1])  # dS K, scaled below
            dk[h0:h1, :kend] += np.matmul(dp.swapaxes(-1, -2), pb.q[h0:h1, t0:t1])  # dSᵀ (scale · Q)

    pb.split(body)
    dq *= pb.scale
    if dropout_p:
        dv *= pb.dtype.type(1.0 / (1.0 - dropout_p))
    dk, dv = (sum_kv_groups(x.reshape(k.shape), n_kv_heads) for x in (dk, dv))  # (B, Hkv, S, D)
    return dq.reshape(q.shape), dk, dv
