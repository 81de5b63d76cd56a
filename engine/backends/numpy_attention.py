"""Blocked ("flash") attention for the numpy backend: the same results as
``kernels/attention_ref.py``, in memory linear in T.

Queries go in blocks of rows. A causal block multiplies only against the keys it can
see (the masked half is never computed), takes its softmax there, and keeps one
log-sum-exp per row; backward recomputes each block's probabilities from that lse
instead of keeping a (T, S) matrix. Groups of heads go to the backend's threads as they
come free, one BLAS thread each; each group copies its q, k, v (usually strided views of
the model's qkv projection) into small contiguous arrays on the thread that works on it.

Shapes: q (B, H, T, D); k, v (B, Hkv, S, D); o (B, H, T, D); lse (B, H, T). The causal
mask is bottom-right aligned as in the reference: row i sees key j iff j <= i + (S - T).
With grouped-query K/V heads (Hkv < H) each group of query heads copies the K/V heads it
reads (never all of them repeated to H heads); their gradients are kept per query head
and summed per K/V head on exit, as the reference does.

The dropout keep-mask is the reference's draw, ``default_rng(seed).random((B, H, T, S),
float32) >= p``, produced block by block: each block jumps the generator to its own
place in that stream, so forward and backward draw only the rows they work on.
"""

from __future__ import annotations

import math

import numpy as np

from engine.backends.numpy_threads import THREADS, one_blas_thread, parallel_pieces
from kernels.attention_ref import _check_inputs, sum_kv_groups

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
    """The inputs as given (any strides) and the constants every block needs. Each group of
    heads takes its own contiguous copies (``take``), on the thread that works on it."""

    def __init__(self, q, k, v, scale, causal, dropout_p, seed):
        B, H, T, S, D = _check_inputs(q, k, v, causal, None, 0.0)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
        self.dtype = q.dtype
        self.q, self.k, self.v = q, k, v  # (B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)
        self.per_kv = H // k.shape[1]  # query heads per K/V head
        self.B, self.H, self.T, self.S, self.D = B, H, T, S, D
        self.scale = self.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
        self.causal, self.dropout_p, self.seed = causal, dropout_p, seed
        self.bq, self.group = _plan(T, S)
        # -inf above the diagonal of a block's last bq keys (the only keys it masks)
        self.upper = np.triu(np.full((self.bq, self.bq), -np.inf, dtype=self.dtype), 1)

    def blocks(self):
        """(t0, t1, kend): query rows [t0, t1) see keys [0, kend)."""
        for t0 in range(0, self.T, self.bq):
            t1 = min(t0 + self.bq, self.T)
            yield t0, t1, (t1 + self.S - self.T) if self.causal else self.S

    def _where(self, h0, h1):
        """(batch row, head slice) of flat heads h0..h1, which lie in one batch row."""
        j0 = h0 % self.H
        return h0 // self.H, slice(j0, j0 + h1 - h0)

    def heads(self, x, h0, h1, kv=False):
        """Flat heads h0..h1 of x (B, H or Hkv, L, D) as a contiguous (h1 - h0, L, D) copy; for
        K/V, each query head's shared K/V head (GQA: not repeated up front)."""
        b, js = self._where(h0, h1)
        if kv and self.per_kv > 1:
            return x[b, np.arange(js.start, js.stop) // self.per_kv]  # fancy indexing: a new C-ordered array
        return np.ascontiguousarray(x[b, js], dtype=self.dtype)

    def take(self, h0, h1):
        """(scale · q, k, v) of flat heads h0..h1, contiguous. The scale goes on q (T·D products)
        rather than on each block's scores (T·S); dropout's 1 / (1 - p) goes on v (S·D values)
        rather than on each block's probabilities."""
        b, js = self._where(h0, h1)
        q = np.multiply(self.q[b, js], self.scale, out=np.empty((h1 - h0, self.T, self.D), self.dtype))
        k, v = self.heads(self.k, h0, h1, kv=True), self.heads(self.v, h0, h1, kv=True)
        if self.dropout_p:
            v = v / self.dtype.type(1.0 - self.dropout_p)
        return q, k, v  # (n, T, D), (n, S, D), (n, S, D)

    def scores(self, q, k, t0, t1, kend):
        """q kᵀ of one block of a group's heads, masked: (n, t1 - t0, kend); q is scaled already
        (and may carry a column that rides along with one in k)."""
        s = np.matmul(q[:, t0:t1], k[:, :kend].swapaxes(-1, -2))  # (n, bq, kend)
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
        """body(h0, h1) over groups of flat heads, none spanning two batch rows, at least one
        group per thread; each group goes to whichever thread is free."""
        per = min(self.group, -(-self.B * self.H // THREADS))  # heads per group
        groups = [(h0, min(h0 + per, (b + 1) * self.H))
                  for b in range(self.B) for h0 in range(b * self.H, (b + 1) * self.H, per)]
        with one_blas_thread():
            parallel_pieces(len(groups), 1, lambda lo, hi: body(*groups[lo]))


def attention_forward(q, k, v, scale=None, causal=True, dropout_p=0.0, seed=0):
    """o = dropout(softmax(scale · q kᵀ + mask)) v and the rows' lse; see the module docstring."""
    pb = _Problem(q, k, v, scale, causal, dropout_p, seed)
    o = np.empty((pb.B * pb.H, pb.T, pb.D), dtype=pb.dtype)  # (BH, T, D)
    lse = np.empty((pb.B * pb.H, pb.T), dtype=pb.dtype)  # (BH, T)

    def body(h0, h1):
        qg, kg, vg = pb.take(h0, h1)  # (n, T, D), (n, S, D), (n, S, D)
        for t0, t1, kend in pb.blocks():
            s = pb.scores(qg, kg, t0, t1, kend)  # (n, bq, kend)
            row_max = s.max(axis=-1, keepdims=True)  # (n, bq, 1): finite, every row sees a key
            s -= row_max
            np.exp(s, out=s)
            total = s.sum(axis=-1, keepdims=True)  # (n, bq, 1)
            lse[h0:h1, t0:t1] = (row_max + np.log(total))[..., 0]
            keep = pb.keep(h0, h1, t0, t1, kend)
            if keep is not None:
                s *= keep  # the scale 1 / (1 - p) is in vg
            out = o[h0:h1, t0:t1]  # (n, bq, D)
            np.matmul(s, vg[:, :kend], out=out)
            out /= total  # softmax's division on the (bq, D) output, not on the (bq, kend) scores

    pb.split(body)
    return o.reshape(q.shape), lse.reshape(q.shape[:3])


def _with_column(a: np.ndarray, column: np.ndarray | float) -> np.ndarray:
    """(n, L, D) → (n, L, D + 1): a with ``column`` (n, L) or a scalar as its last column."""
    out = np.empty(a.shape[:-1] + (a.shape[-1] + 1,), dtype=a.dtype)  # (n, L, D + 1)
    out[..., :-1] = a
    out[..., -1] = column
    return out


def attention_backward(do, q, k, v, o, lse, scale=None, causal=True, dropout_p=0.0, seed=0):
    """(dq, dk, dv) of attention_forward, each block's probabilities recomputed from lse
    (the formulas are in kernels/attention_ref.attention_backward).

    The row terms ride along in the products as an extra column: [scale·q, −lse] [k, 1]ᵀ is
    S − lse and [dO, −δ] [v, 1]ᵀ is dO vᵀ − δ, each a pass over the block's scores saved.
    NOTE: on the 2-core VM a 65-deep product of a block took 1.01x the time of the 64-deep one,
    the pass it replaces 0.18x."""
    pb = _Problem(q, k, v, scale, causal, dropout_p, seed)
    lse = np.asarray(lse, dtype=pb.dtype).reshape(pb.B * pb.H, pb.T)  # (BH, T)
    dq = np.empty((pb.B * pb.H, pb.T, pb.D), dtype=pb.dtype)  # (BH, T, D)
    dk = np.zeros((pb.B * pb.H, pb.S, pb.D), dtype=pb.dtype)  # (BH, S, D), per query head
    dv = np.zeros_like(dk)  # (BH, S, D), per query head

    def body(h0, h1):
        qg, kg, vg = pb.take(h0, h1)  # (n, T, D), (n, S, D), (n, S, D)
        do_g = pb.heads(do, h0, h1)  # (n, T, D)
        delta = np.einsum("ntd,ntd->nt", do_g, pb.heads(o, h0, h1))  # (n, T)
        q_lse, k_one = _with_column(qg, -lse[h0:h1]), _with_column(kg, 1)  # (n, T, D + 1), (n, S, D + 1)
        # with dropout δ comes after the mask (dP·keep − δ), so it cannot ride along
        do_delta = _with_column(do_g, -delta) if not dropout_p else None  # (n, T, D + 1)
        v_one = _with_column(vg, 1) if not dropout_p else None  # (n, S, D + 1)
        for t0, t1, kend in pb.blocks():
            p = pb.scores(q_lse, k_one, t0, t1, kend)  # (n, bq, kend): S − lse
            np.exp(p, out=p)
            do_blk = do_g[:, t0:t1]  # (n, bq, D)
            keep = pb.keep(h0, h1, t0, t1, kend)
            p_kept = p if keep is None else p * keep  # (n, bq, kend); 1 / (1 - p) is applied to dv below
            dv[h0:h1, :kend] += np.matmul(p_kept.swapaxes(-1, -2), do_blk)
            if keep is None:
                dp = np.matmul(do_delta[:, t0:t1], v_one[:, :kend].swapaxes(-1, -2))  # (n, bq, kend): dP − δ
            else:
                dp = np.matmul(do_blk, vg[:, :kend].swapaxes(-1, -2))  # (n, bq, kend)
                dp *= keep
                dp -= delta[:, t0:t1, None]
            dp *= p  # dS
            np.matmul(dp, kg[:, :kend], out=dq[h0:h1, t0:t1])  # dS K, scaled below
            dk[h0:h1, :kend] += np.matmul(dp.swapaxes(-1, -2), qg[:, t0:t1])  # dSᵀ (scale · Q)
        dq[h0:h1] *= pb.scale
        if dropout_p:
            dv[h0:h1] *= pb.dtype.type(1.0 / (1.0 - dropout_p))

    pb.split(body)
    shape = (pb.B, pb.H, pb.S, pb.D)
    dk, dv = (sum_kv_groups(x.reshape(shape), k.shape[1]) for x in (dk, dv))  # (B, Hkv, S, D)
    return dq.reshape(q.shape), dk, dv
