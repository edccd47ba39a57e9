"""Exact softmax attention (NLA) in bounded memory: blocks of queries and keys, online softmax.

``softmax_attention(q, k, v)`` = ``softmax_j(q_i · k_j) v_j`` without ever forming the N×L score
matrix: queries are taken in blocks of ``block_q`` and, for each, keys in blocks of ``block_k``,
with a running maximum, normaliser and weighted sum per query (the online softmax of
memory-efficient / flash attention). Only a [..., block_q, block_k] block of scores exists at a
time. The custom VJP keeps the output and each query's log-normaliser (O(N)) and recomputes the
score blocks in the backward pass: ``dV_j = Σ_i P_ijᵀ dO_i``, ``dS = P ∘ (dO Vᵀ − Σ_c dO·O)``,
``dQ_i = Σ_j dS_ij K_j``, ``dK_j = Σ_i dS_ijᵀ Q_i``, in one pass over query blocks (for dQ) and
one over key blocks (for dK, dV). Cost: the dense form's FLOPs forward, twice them backward;
memory O((N + L)·(D + Cv)) plus one block.

`dense_softmax_attention` is the N×L form, for reference and for comparison in the benchmarks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PrecisionLike = Any

#: Scores per block (batch included) that `block_sizes` aims at: 4 Mi float32 = 16 MiB.
BLOCK_ELEMENTS = 2**22


def _even_split(total: int, most: int) -> int:
    """The smallest block size ≤ ``most`` that cuts ``total`` into as few blocks as ``most`` does,
    so that padding to a multiple of it wastes less than one row per block."""
    count = -(-total // max(1, most))
    return -(-total // count)


def block_sizes(batch: int, num_queries: int, num_keys: int) -> tuple[int, int]:
    """(block_q, block_k) for ``batch`` examples of N queries and L keys: keys in blocks of up to
    1024, queries in as many rows as keep a block of scores near `BLOCK_ELEMENTS`, both as even
    splits of N and L (2304 keys: 3 blocks of 768, not 3 of 1024 with 768 padded)."""
    block_k = _even_split(num_keys, 1024)
    block_q = _even_split(num_queries, max(1, BLOCK_ELEMENTS // max(1, batch * block_k)))
    return block_q, block_k


def _pad_to(x: Array, multiple: int, axis: int, value: Any = 0) -> Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: Array, size: int, axis: int) -> Array:
    """x with ``axis`` (a multiple of size) cut into blocks, the block index first."""
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: Array, axis: int) -> Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _masked_scores(q: Array, k: Array, valid: Array, precision: PrecisionLike) -> Array:
    """Scores [B, bq, bk] with −inf for invalid keys (valid: [B, bk])."""
    s = jnp.einsum("bnd,bld->bnl", q, k, precision=precision)
    return jnp.where(valid[:, None, :], s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, valid, block_q, block_k, precision):
    return _forward(q, k, v, valid, block_q, block_k, precision)[0]


def _forward(q, k, v, valid, block_q, block_k, precision):
    """Output [B, N, Cv] and log-normaliser [B, N] (padded N, L: multiples of the blocks)."""
    k_blocks, v_blocks, valid_blocks = _blocks(k, block_k, 1), _blocks(v, block_k, 1), _blocks(valid, block_k, 1)

    def query_block(q_block):  # [B, bq, D]
        batch, rows = q_block.shape[:2]
        init = (
            jnp.full((batch, rows), -jnp.inf, q.dtype),  # running max
            jnp.zeros((batch, rows), q.dtype),  # running normaliser
            jnp.zeros((batch, rows, v.shape[-1]), q.dtype),  # running weighted sum
        )

        def key_block(carry, inputs):
            m, l, acc = carry
            k_block, v_block, valid_block = inputs
            s = _masked_scores(q_block, k_block, valid_block, precision)  # [B, bq, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # The running max cancels between numerator and normaliser; −inf (no valid key yet)
            # is replaced by 0 so that exp(−inf − −inf) never appears.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            scale = jnp.exp(jnp.where(jnp.isfinite(m), m, shift) - shift)
            acc = acc * scale[..., None] + jnp.einsum("bnl,blc->bnc", p, v_block, precision=precision)
            return (m_new, l * scale + jnp.sum(p, axis=-1), acc), None

        (m, l, acc), _ = lax.scan(key_block, init, (k_blocks, v_blocks, valid_blocks))
        log_normaliser = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l)  # −inf where no valid key
        return acc / l[..., None], log_normaliser  # 0/0 = NaN where no valid key, as the dense form

    out, log_normaliser = lax.map(query_block, _blocks(q, block_q, 1))
    return _unblock(out, 1), _unblock(log_normaliser, 1)


def _fwd(q, k, v, valid, block_q, block_k, precision):
    out, log_normaliser = _forward(q, k, v, valid, block_q, block_k, precision)
    return out, (q, k, v, valid, out, log_normaliser)


def _bwd(block_q, block_k, precision, residuals, d_out):
    q, k, v, valid, out, log_normaliser = residuals
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, N]: Σ_c dO·O

    def probabilities(q_block, k_block, valid_block, lse_block):
        s = _masked_scores(q_block, k_block, valid_block, precision)
        return jnp.exp(s - lse_block[..., None])  # P [B, bq, bk]

    q_b, do_b = _blocks(q, block_q, 1), _blocks(d_out, block_q, 1)
    lse_b, delta_b = _blocks(log_normaliser, block_q, 1), _blocks(delta, block_q, 1)
    k_b, v_b, valid_b = _blocks(k, block_k, 1), _blocks(v, block_k, 1), _blocks(valid, block_k, 1)

    def dq_of(inputs):  # one query block, all key blocks
        q_block, do_block, lse_block, delta_block = inputs

        def key_block(dq, key_inputs):
            k_block, v_block, valid_block = key_inputs
            p = probabilities(q_block, k_block, valid_block, lse_block)
            dp = jnp.einsum("bnc,blc->bnl", do_block, v_block, precision=precision)
            ds = p * (dp - delta_block[..., None])
            return dq + jnp.einsum("bnl,bld->bnd", ds, k_block, precision=precision), None

        return lax.scan(key_block, jnp.zeros_like(q_block), (k_b, v_b, valid_b))[0]

    def dkv_of(inputs):  # one key block, all query blocks
        k_block, v_block, valid_block = inputs

        def query_block(carry, query_inputs):
            dk, dv = carry
            q_block, do_block, lse_block, delta_block = query_inputs
            p = probabilities(q_block, k_block, valid_block, lse_block)
            dv = dv + jnp.einsum("bnl,bnc->blc", p, do_block, precision=precision)
            dp = jnp.einsum("bnc,blc->bnl", do_block, v_block, precision=precision)
            ds = p * (dp - delta_block[..., None])
            return (dk + jnp.einsum("bnl,bnd->bld", ds, q_block, precision=precision), dv), None

        init = (jnp.zeros_like(k_block), jnp.zeros_like(v_block))
        return lax.scan(query_block, init, (q_b, do_b, lse_b, delta_b))[0]

    dq = _unblock(lax.map(dq_of, (q_b, do_b, lse_b, delta_b)), 1)
    dk, dv = lax.map(dkv_of, (k_b, v_b, valid_b))
    return dq, _unblock(dk, 1), _unblock(dv, 1), None


_attention.defvjp(_fwd, _bwd)


def blocked_softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    precision: PrecisionLike = None,
    block_size: int | tuple[int, int] | None = None,
) -> Array:
    """``softmax_j(q_i · k_j) v_j`` in blocks: q [..., N, D], k [..., L, D], v [..., L, Cv] → [..., N, Cv].

    Computed in float32 (or wider), returned in that dtype. ``mask`` [..., L] bool leaves keys
    out. ``block_size``: ``(block_q, block_k)`` or one int for both; None: `block_sizes`.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    batch_shape = q.shape[:-2]
    n, num_keys = q.shape[-2], k.shape[-2]
    q3 = q.astype(dtype).reshape((-1, n, q.shape[-1]))
    k3 = k.astype(dtype).reshape((-1, num_keys, k.shape[-1]))
    v3 = v.astype(dtype).reshape((-1, num_keys, v.shape[-1]))
    valid = jnp.ones((q3.shape[0], num_keys), bool) if mask is None else mask.reshape(-1, num_keys).astype(bool)
    if block_size is None:
        block_q, block_k = block_sizes(q3.shape[0], n, num_keys)
    else:
        block_q, block_k = (block_size, block_size) if isinstance(block_size, int) else block_size
        if min(block_q, block_k) < 1:
            raise ValueError(f"block_size must be positive, got {block_size!r}.")
        block_q, block_k = min(block_q, n), min(block_k, num_keys)
    q3 = _pad_to(q3, block_q, 1)
    k3, v3 = _pad_to(k3, block_k, 1), _pad_to(v3, block_k, 1)
    valid = _pad_to(valid, block_k, 1, False)
    out = _attention(q3, k3, v3, valid, int(block_q), int(block_k), precision)[:, :n]
    return out.reshape(batch_shape + (n, v.shape[-1]))


def dense_softmax_attention(
    q: Array, k: Array, v: Array, *, mask: Array | None = None, precision: PrecisionLike = None
) -> Array:
    """The same as `blocked_softmax_attention` with the whole [..., N, L] score matrix formed."""
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("...nd,...ld->...nl", q.astype(dtype), k.astype(dtype), precision=precision)
    if mask is not None:
        logits = jnp.where(mask[..., None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("...nl,...lc->...nc", weights, v.astype(dtype), precision=precision)
