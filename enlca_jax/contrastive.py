"""Contrastive sparse aggregation: the authors' ranked-window loss, computed without sorting.

For every query i the keys are ranked by ``T_ij = q_i · k_j``; the loss compares the mean of
``exp(T)`` over ranks ``[0, P)`` (positives) with the mean over ranks ``[S, S + K)`` (negatives):
``loss_i = relu(margin - log(pos_i / (neg_i + ratio_eps)))``. It depends only on the values in
the two rank windows, not on which keys hold them, so it needs three order statistics per row —
the values at ranks P − 1, S and S + K − 1 (0-based, descending, ties counted) — and masked sums:

    pos_sum = Σ_{T > a} e^T + (P − #{T > a}) e^a                  a = value at rank P − 1
    neg_sum = Σ_{w < T < u} e^T + n_u e^u + n_w e^w                u, w = values at ranks S, S + K − 1
              n_u = min(#{T ≥ u}, S + K) − S,   n_w = K − n_u − #{w < T < u}   (K e^u when u = w)

A boundary value shared by several keys (a tie) counts exactly as many times as the ranked
definition puts it inside the window; in the gradient, that share is split evenly over the tied
keys (for tied scores any split is a valid derivative; the even one is the symmetric choice).

`order_statistics` finds those values exactly by bisection on order-preserving unsigned integer
keys of the float bits: the r-th largest key is built bit by bit from the top, each bit one count
``#{key ≥ candidate}`` per row (32 rounds for float32, 64 for float64). To count over few scores,
each row is first cut to its candidates (`_candidates`): scores in groups of `GROUP`, a few
value bisections over the group maxima for a bound below the deepest needed rank, and the
groups above it gathered (their positions found from bit-packed masks, without a sort). Every
score of the windows and all their ties are among them, so the result is exact; a row with too
many candidates (long runs of equal scores) makes its block fall back to whole rows.

Rows are processed in blocks (`default_block_rows`), in two passes (candidates, then order
statistics and window sums). `contrastive_loss` has a custom VJP: the backward pass forms the
gradient of T elementwise from the stored thresholds and applies the two products with k and
q; it never redoes the selection. T is computed once and kept (``keep_scores=True``, as the
``top_k`` formulation keeps it) or recomputed block by block, forward and backward, so that at
most one block of it is alive. There is no sort and no top_k anywhere in the program.

``method='top_k'`` keeps the previous formulation (``lax.top_k`` of depth S + K and a gather), for
comparison and as a fallback.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PrecisionLike = Any

METHODS = ("select", "top_k")


def contrastive_counts(
    num_positions: int, positive_fraction: float = 0.02, negative_start_fraction: float = 0.08
) -> tuple[int, int, int]:
    """The paper's counts from fractions of N: top ``n1·N`` versus ``n1·N`` from rank ``n2·N``.

    Args:
      num_positions: N (key positions per query).
      positive_fraction: n1 (paper: 2 %).
      negative_start_fraction: n2 (paper: 8 %).

    Returns:
      ``(num_positive, negative_start, num_negative)`` as ints (floor, at least 1), e.g.
      N = 2304 (48×48) gives (46, 184, 46).
    """
    if not 0 < positive_fraction < 1 or not 0 <= negative_start_fraction < 1:
        raise ValueError(
            f"fractions must lie in (0, 1): got positive {positive_fraction}, negative start {negative_start_fraction}."
        )
    count = max(1, int(math.floor(positive_fraction * num_positions)))
    start = int(math.floor(negative_start_fraction * num_positions))
    if start + count > num_positions:
        raise ValueError(
            f"N = {num_positions} positions is too few for fractions "
            f"({positive_fraction}, {negative_start_fraction}): need start + count = "
            f"{start + count} <= N."
        )
    return count, start, count


# ---------------------------------------------------------------------------------------------
# Exact order statistics by bisection on the float bits
# ---------------------------------------------------------------------------------------------


def _key_types(dtype: Any) -> tuple[Any, Any, int]:
    """(unsigned, signed) integer types of the float's width, and its number of bits."""
    if dtype == jnp.float64:
        return jnp.uint64, jnp.int64, 64
    if dtype == jnp.float32:
        return jnp.uint32, jnp.int32, 32
    raise ValueError(f"order statistics are computed on float32 or float64 scores, got {dtype}.")


def order_keys(x: Array) -> Array:
    """Unsigned integers with the order of the floats x (−0 taken as +0, subnormals as XLA treats
    them; NaN not allowed).

    Non-negative floats get their sign bit set, negative ones all bits flipped, so that
    ``x < y ⟺ key(x) < key(y)`` and ``x == y ⟺ key(x) == key(y)``.
    """
    unsigned, signed, bits = _key_types(x.dtype)
    raw = lax.bitcast_convert_type(x + jnp.zeros((), x.dtype), unsigned)  # x + 0: −0 → +0
    negative = lax.bitcast_convert_type(x + jnp.zeros((), x.dtype), signed) < 0
    return jnp.where(negative, ~raw, raw | jnp.asarray(1 << (bits - 1), unsigned))


def from_order_keys(key: Array, dtype: Any) -> Array:
    """Inverse of `order_keys`."""
    unsigned, _, bits = _key_types(jnp.dtype(dtype))
    top = jnp.asarray(1 << (bits - 1), unsigned)
    raw = jnp.where((key & top) != 0, key ^ top, ~key)
    return lax.bitcast_convert_type(raw, dtype)


def order_statistics(x: Array, ranks: tuple[int, ...]) -> Array:
    """The values at 0-based descending ``ranks`` of every row of x, ties counted.

    ``order_statistics(x, (r,))[..., 0]`` equals ``jnp.sort(x, -1)[..., ::-1][..., r]`` exactly.

    Args:
      x: [..., L] float32 or float64, finite.
      ranks: ints in [0, L).

    Returns:
      [..., len(ranks)] in the dtype of x.
    """
    unsigned, _, bits = _key_types(x.dtype)
    keys = order_keys(x)  # [..., L]

    def round_(i, answers):
        # Greedy from the top bit: keep a bit when at least r + 1 keys are ≥ the answer with it
        # set. One count per rank, each a fused compare-and-sum over [..., L] (nothing of size R·L).
        bit = jnp.asarray(1, unsigned) << (bits - 1 - i).astype(unsigned)
        updated = []
        for answer, rank in zip(answers, ranks, strict=True):
            candidate = answer | bit
            count = jnp.sum(keys >= candidate[..., None], axis=-1, dtype=jnp.int32)
            updated.append(jnp.where(count > rank, candidate, answer))
        return tuple(updated)

    # 8 rounds per loop iteration: few iterations (each a host round trip on some backends),
    # and a program small enough to compile fast.
    init = tuple(jnp.zeros(x.shape[:-1], unsigned) for _ in ranks)
    answers = lax.fori_loop(0, bits, round_, init, unroll=8)
    return from_order_keys(jnp.stack(answers, axis=-1), x.dtype)


# ---------------------------------------------------------------------------------------------
# The loss, blockwise, with a custom VJP
# ---------------------------------------------------------------------------------------------


class _Windows(NamedTuple):
    """Static description of the two rank windows."""

    positive: int
    start: int
    negative: int
    margin: float
    ratio_eps: float


class _RowStats(NamedTuple):
    """Per-query thresholds and window weights of the boundary values: [..., N] each."""

    a: Array  # value at rank P − 1
    u: Array  # value at rank S
    w: Array  # value at rank S + K − 1
    tie_a: Array  # weight of an element equal to a in the positive window: (P − #{T > a}) / #{T = a}
    tie_u: Array  # weight of an element equal to u in the negative window
    tie_w: Array  # weight of an element equal to w (0 when u = w: tie_u carries it)
    scale_pos: Array  # d loss_i / d Σ_pos e^T (with the per-query 1/N and the relu mask), set by the VJP
    scale_neg: Array


def _window_weights(t: Array, stats: _RowStats) -> tuple[Array, Array]:
    """Weights [..., R, L] of each exp(T_ij) in the positive and negative window sums."""
    a, u, w = stats.a[..., None], stats.u[..., None], stats.w[..., None]
    pos = jnp.where(t > a, 1.0, jnp.where(t == a, stats.tie_a[..., None], 0.0))
    inside = (t > w) & (t < u)
    at_w = jnp.where(t == w, stats.tie_w[..., None], 0.0)
    neg = jnp.where(inside, 1.0, jnp.where(t == u, stats.tie_u[..., None], at_w))
    return pos.astype(t.dtype), neg.astype(t.dtype)


def _block_stats(t: Array, win: _Windows) -> tuple[_RowStats, Array, Array]:
    """Thresholds, tie weights and the two window sums of a block of scores t: [..., R, L]."""
    p, s, k = win.positive, win.start, win.negative
    values = order_statistics(t, (p - 1, s, s + k - 1))
    a, u, w = values[..., 0], values[..., 1], values[..., 2]
    count = functools.partial(jnp.sum, axis=-1, dtype=jnp.int32)
    gt_a, eq_a = count(t > a[..., None]), count(t == a[..., None])
    ge_u, eq_u = count(t >= u[..., None]), count(t == u[..., None])
    between, eq_w = count((t > w[..., None]) & (t < u[..., None])), count(t == w[..., None])
    n_u = jnp.minimum(ge_u, s + k) - s  # window ranks holding u
    n_w = k - n_u - between  # window ranks holding w (when w < u)
    dtype = t.dtype
    tie_a = (p - gt_a).astype(dtype) / eq_a.astype(dtype)
    same = u == w
    tie_u = jnp.where(same, k, n_u).astype(dtype) / eq_u.astype(dtype)
    tie_w = jnp.where(same, 0, n_w).astype(dtype) / eq_w.astype(dtype)
    zeros = jnp.zeros_like(a)
    stats = _RowStats(a, u, w, tie_a, tie_u, tie_w, zeros, zeros)
    e = jnp.exp(t)
    pos_weight, neg_weight = _window_weights(t, stats)
    return stats, jnp.sum(e * pos_weight, axis=-1), jnp.sum(e * neg_weight, axis=-1)


#: Candidate reduction: scores are taken in groups of `GROUP`; groups whose maximum is below a
#: lower bound of the deepest needed order statistic cannot hold a windowed score. `ROUNDS` value
#: bisections over the group maxima find a bound that leaves few groups; at most the deepest rank
#: + `SPARE` groups are kept, and a block with a row that needs more (many equal scores) is
#: computed on whole rows instead.
GROUP = 4
ROUNDS = 10
SPARE = 16


def _set_bit_positions(mask: Array, capacity: int) -> tuple[Array, Array]:
    """Positions of the first ``capacity`` True entries of each row of mask [..., G] (G where a
    row has fewer), and the number of True entries [...].

    Without gathers or long prefix sums (both slow on XLA:CPU): the mask is packed into 32-bit
    words; a slot finds its word by comparing with the words' cumulative popcounts, and its bit
    within the word by a five-step binary descent on popcounts.
    """
    g = mask.shape[-1]
    num_words = -(-g // 32)
    padded = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, num_words * 32 - g)])
    bits = padded.reshape(mask.shape[:-1] + (num_words, 32)).astype(jnp.uint32)
    words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)  # [..., W]
    popcount = lax.population_count(words).astype(jnp.int32)
    cumulative = jnp.cumsum(popcount, axis=-1)  # [..., W], inclusive
    slot = jnp.arange(capacity, dtype=jnp.int32)[:, None]  # slot s holds the (s + 1)-th True
    word_index = jnp.sum(cumulative[..., None, :] <= slot, axis=-1, dtype=jnp.int32)  # [..., C]
    in_word = jnp.arange(num_words, dtype=jnp.int32) == word_index[..., None]  # [..., C, W]
    word = jnp.sum(jnp.where(in_word, words[..., None, :], 0), axis=-1, dtype=jnp.uint32)
    before = jnp.sum(jnp.where(in_word, (cumulative - popcount)[..., None, :], 0), axis=-1, dtype=jnp.int32)
    rank = slot[:, 0] - before  # 0-based rank of the wanted set bit within its word
    position = jnp.zeros_like(rank)
    for width in (16, 8, 4, 2, 1):
        low = (word >> position.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)
        below = lax.population_count(low).astype(jnp.int32)
        higher = rank >= below
        rank, position = jnp.where(higher, rank - below, rank), jnp.where(higher, position + width, position)
    count = cumulative[..., -1]
    return jnp.where(slot[:, 0] < count[..., None], word_index * 32 + position, g), count


def _candidates(t: Array, depth: int, capacity: int) -> tuple[Array, Array]:
    """Scores of the groups that can hold one of a row's top ``depth``: [..., capacity·GROUP] (−inf
    in unused slots), and whether a row had more such groups than ``capacity`` ([...] bool).

    Every score at or above the depth-th largest lies in a group whose maximum is at least it;
    a bound lo with #{group max ≥ lo} ≥ depth is at most the depth-th largest group maximum,
    hence at most the depth-th largest score, so the kept groups hold every score of rank < depth
    and all its ties: their order statistics and window sums are the whole row's.
    """
    g = -(-t.shape[-1] // GROUP)
    padding = [(0, 0)] * (t.ndim - 1) + [(0, g * GROUP - t.shape[-1])]
    groups = jnp.pad(t, padding, constant_values=-jnp.inf).reshape(t.shape[:-1] + (g, GROUP))
    maxima = jnp.max(groups, axis=-1)  # [..., G]
    lo, hi = jnp.min(maxima, axis=-1), jnp.max(maxima, axis=-1)  # #{≥ lo} = G ≥ depth
    for _ in range(ROUNDS):
        mid = lo + 0.5 * (hi - lo)
        enough = jnp.sum(maxima >= mid[..., None], axis=-1, dtype=jnp.int32) >= depth
        lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    index, count = _set_bit_positions(maxima >= lo[..., None], capacity)  # g: the −inf group below
    groups = jnp.concatenate([groups, jnp.full(groups.shape[:-2] + (1, GROUP), -jnp.inf, t.dtype)], axis=-2)
    picked = jnp.take_along_axis(groups, index[..., None], axis=-2)  # [..., capacity, GROUP]
    return picked.reshape(t.shape[:-1] + (capacity * GROUP,)), count > capacity


def _capacity(win: _Windows, num_keys: int) -> int | None:
    """Groups kept per row by `_candidates`, or None where that would not be fewer scores."""
    depth = max(win.positive, win.start + win.negative)
    capacity = depth + SPARE
    return capacity if capacity * GROUP < num_keys else None


def _per_query(pos_sum: Array, neg_sum: Array, win: _Windows) -> tuple[Array, Array]:
    """(loss [..., N], its margin argument), from the window sums."""
    pos = pos_sum / win.positive
    neg = neg_sum / win.negative
    argument = win.margin - jnp.log(pos / (neg + win.ratio_eps))
    return jax.nn.relu(argument), argument


def _blocks(n: int, block_rows: int) -> tuple[int, int]:
    """(rows per block, number of blocks) for n rows; a divisor of n close to ``block_rows`` when
    there is one (no padding), else ``block_rows`` with n padded up to a multiple."""
    rows = max(1, min(block_rows, n))
    divisor = next((d for d in range(rows, max(1, rows // 2) - 1, -1) if n % d == 0), None)
    rows = divisor or rows
    return rows, -(-n // rows)


def _split(x: Array, rows: int, num_blocks: int, axis: int) -> Array:
    """x with ``axis`` (of length n ≤ rows·num_blocks) cut into blocks: [num_blocks, ...,
    rows, ...] with the block axis first, zero-padded at the end."""
    n = x.shape[axis]
    if rows * num_blocks != n:
        x = jnp.pad(x, [(0, 0)] * axis + [(0, rows * num_blocks - n)] + [(0, 0)] * (x.ndim - axis - 1))
    x = x.reshape(x.shape[:axis] + (num_blocks, rows) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _merge(x: Array, n: int, axis: int) -> Array:
    """Inverse of `_split` (the padding dropped)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return lax.slice_in_dim(x, 0, n, axis=axis)


def _scores(q: Array, k: Array, precision: PrecisionLike) -> Array:
    return jnp.einsum("bnd,bld->bnl", q, k, precision=precision)  # [B, N, L]


def _rows_stats(candidates: Array | None, overflow: Array | None, whole: Any, win: _Windows) -> tuple:
    """`_block_stats` of a block of rows from its candidates, or from ``whole()`` (the rows' full
    scores) when there are none or a row overflowed."""
    if candidates is None:
        return _block_stats(whole(), win)
    return lax.cond(jnp.any(overflow), lambda: _block_stats(whole(), win), lambda: _block_stats(candidates, win))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _select_loss(
    q: Array, k: Array, win: _Windows, block_rows: int, precision: PrecisionLike, keep_scores: bool
) -> Array:
    return _select_forward(q, k, win, block_rows, precision, keep_scores)[0]


def _select_forward(q, k, win, block_rows, precision, keep_scores):
    """Per-query losses [B, N] and what the backward pass needs: the thresholds, the window sums
    and, with ``keep_scores``, T itself.

    Two passes over blocks of rows: the first finds each row's candidates (`_candidates`), the
    second computes the order statistics and window sums on them (on whole rows for a block where
    a row had too many). With ``keep_scores`` T is computed as one product and cut into blocks of
    ``block_rows`` rows of the flattened [B·N, L]; otherwise each pass computes the scores of its
    block of ``block_rows`` queries per example, so that only a block of T is ever alive. (In one
    pass XLA:CPU fuses candidates and statistics into loops several times slower.)
    """
    batch, n, _ = q.shape
    num_keys = k.shape[1]
    capacity = _capacity(win, num_keys)
    depth = max(win.positive, win.start + win.negative)

    def candidates_of(t):
        return _candidates(t, depth, capacity) if capacity else (None, None)

    if keep_scores:
        t = _scores(q, k, precision)
        rows, num_blocks = _blocks(batch * n, block_rows)
        t_blocks = _split(t.reshape(batch * n, num_keys), rows, num_blocks, axis=0)  # [nb, R, L]
        candidates, overflow = lax.map(candidates_of, t_blocks)
        per_block = lax.map(lambda a: _rows_stats(a[1], a[2], lambda: a[0], win), (t_blocks, candidates, overflow))
        stats, pos_sum, neg_sum = jax.tree_util.tree_map(lambda x: _merge(x, batch * n, 0).reshape(batch, n), per_block)
        residual = t
    else:
        rows, num_blocks = _blocks(n, block_rows)
        q_blocks = _split(q, rows, num_blocks, axis=1)  # [nb, B, R, D]
        candidates, overflow = lax.map(lambda qb: candidates_of(_scores(qb, k, precision)), q_blocks)
        per_block = lax.map(
            lambda a: _rows_stats(a[1], a[2], lambda: _scores(a[0], k, precision), win),
            (q_blocks, candidates, overflow),
        )
        stats, pos_sum, neg_sum = jax.tree_util.tree_map(lambda x: _merge(x, n, 1), per_block)
        residual = None
    loss, argument = _per_query(pos_sum, neg_sum, win)
    return loss, (q, k, residual, _RowStats(*stats), pos_sum, neg_sum, argument)


def _select_fwd(q, k, win, block_rows, precision, keep_scores):
    return _select_forward(q, k, win, block_rows, precision, keep_scores)


def _score_gradient(t: Array, stats: _RowStats) -> Array:
    """dT = e^T (scale_pos · pos_weight + scale_neg · neg_weight): [..., R, L]."""
    pos_weight, neg_weight = _window_weights(t, stats)
    return jnp.exp(t) * (stats.scale_pos[..., None] * pos_weight + stats.scale_neg[..., None] * neg_weight)


def _select_bwd(win, block_rows, precision, keep_scores, residuals, g):
    """d loss / d T_ij is elementwise given the stored thresholds (`_score_gradient`); then
    dq = dT k and dk = dTᵀ q. The selection is not redone."""
    q, k, t, stats, pos_sum, neg_sum, argument = residuals
    batch, n, _ = q.shape
    active = (argument > 0).astype(g.dtype) * g  # relu'
    # loss = relu(margin − log(pos_sum / P) + log(neg_sum / K + eps))
    stats = stats._replace(scale_pos=-active / pos_sum, scale_neg=active / (neg_sum + win.ratio_eps * win.negative))
    if keep_scores:
        dt = _score_gradient(t, stats)  # [B, N, L]
        dq = jnp.einsum("bnl,bld->bnd", dt, k, precision=precision)
        return dq, jnp.einsum("bnl,bnd->bld", dt, q, precision=precision)
    rows, num_blocks = _blocks(n, block_rows)
    blocked = _RowStats(*(_split(x, rows, num_blocks, axis=1) for x in stats))

    def block(dk, inputs):
        q_block, block_stats = inputs
        dt = _score_gradient(_scores(q_block, k, precision), block_stats)  # [B, R, L]
        dq_block = jnp.einsum("bnl,bld->bnd", dt, k, precision=precision)
        return dk + jnp.einsum("bnl,bnd->bld", dt, q_block, precision=precision), dq_block

    dk, dq = lax.scan(block, jnp.zeros_like(k), (_split(q, rows, num_blocks, axis=1), blocked))
    return _merge(dq, n, 1), dk


_select_loss.defvjp(_select_fwd, _select_bwd)


def _top_k_loss(q: Array, k: Array, win: _Windows, precision: PrecisionLike) -> Array:
    """The ranked windows through ``lax.top_k`` of depth max(P, S + K): per-query losses [B, N]."""
    scores = jnp.einsum("bnd,bld->bnl", q, k, precision=precision)
    depth = max(win.positive, win.start + win.negative)
    # Rank without gradient, then pick the ranked scores out of T: the gradient reaches T only at
    # the selected entries, as through the authors' sort. (Taking the values of top_k and slicing
    # them lets XLA:CPU rewrite top_k into a full sort of every row.)
    _, index = lax.top_k(lax.stop_gradient(scores), depth)  # [B, N, depth], descending
    top = jnp.take_along_axis(scores, index, axis=-1)
    pos_sum = jnp.sum(jnp.exp(top[..., : win.positive]), axis=-1)
    neg_sum = jnp.sum(jnp.exp(top[..., win.start : win.start + win.negative]), axis=-1)
    return _per_query(pos_sum, neg_sum, win)[0]


def default_block_rows() -> int:
    """Rows of T per block: 256 on the CPU (a block of 2304 keys stays in its caches); 65536 on a
    GPU or TPU, where one large block launches each kernel once (training shapes are one block)."""
    return 256 if jax.default_backend() == "cpu" else 65536


def contrastive_loss(
    q: Array,
    k: Array,
    *,
    num_positive: int = 15,
    negative_start: int = 50,
    num_negative: int = 15,
    margin: float = 1.0,
    ratio_eps: float = 1e-6,
    precision: PrecisionLike = None,
    method: str = "select",
    block_rows: int | None = None,
    keep_scores: bool = True,
) -> Array:
    """The authors' contrastive sparse-aggregation loss, per example.

    With ``T = q k^T`` (q, k already L2-normalised and scaled by sqrt(k), so
    ``T_ij = k·cos(Q_i, K_j)``), for every query i the keys are ranked by ``T_ij``:
    ``pos_i`` = mean of ``exp(T)`` over ranks ``[0, num_positive)``, ``neg_i`` = mean over ranks
    ``[negative_start, negative_start + num_negative)``, and
    ``loss_i = relu(margin - log(pos_i / (neg_i + ratio_eps)))``. The loss is the mean over i.

    Defaults are the authors' current code (15, 50, 15, margin 1); `contrastive_counts` gives
    the paper's n1 = 2 %, n2 = 8 % variant.

    Args:
      q: [..., N, D] normalised, amplified queries.
      k: [..., L, D] normalised, amplified keys.
      num_positive, negative_start, num_negative: rank windows (ints, absolute counts).
      margin: b (authors: 1).
      ratio_eps: added to the negative mean (authors: 1e-6).
      precision: of the q kᵀ products.
      method: ``'select'`` (default: exact order statistics and masked sums, blockwise, no sort;
        see the module docstring) or ``'top_k'`` (``lax.top_k`` of the window depth).
      block_rows: rows of T per block for ``'select'`` (the selection works on one block at a
        time); None: `default_block_rows` for the backend.
      keep_scores: ``'select'`` computes T as one product and keeps it for the backward pass (as
        ``'top_k'`` does); False computes it block by block in both passes, so that at most one
        block of it is ever alive (blocks of ``block_rows // batch`` queries of every example).

    Returns:
      loss: [...] per example (float32 or wider).
    """
    if q.ndim < 2 or k.ndim < 2 or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [..., N, D] and k [..., L, D] disagree: q {q.shape}, k {k.shape}.")
    counts = (num_positive, negative_start, num_negative)
    if any(int(c) != c for c in counts) or num_positive <= 0 or num_negative <= 0 or negative_start < 0:
        raise ValueError(
            f"counts must be integers with num_positive > 0, num_negative > 0 and negative_start >= 0; got {counts}."
        )
    num_keys = k.shape[-2]
    depth = max(num_positive, negative_start + num_negative)
    if depth > num_keys:
        raise ValueError(
            f"contrastive windows need {depth} ranked keys but k has L = {num_keys} positions "
            f"(k.shape = {k.shape}); use smaller counts or `contrastive_counts` fractions."
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if block_rows is None:
        block_rows = default_block_rows()
    if int(block_rows) != block_rows or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}.")
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    batch = q.shape[:-2]
    q3 = q.astype(dtype).reshape((-1,) + q.shape[-2:])
    k3 = k.astype(dtype).reshape((-1,) + k.shape[-2:])
    win = _Windows(int(num_positive), int(negative_start), int(num_negative), float(margin), float(ratio_eps))
    if method == "top_k":
        per_query = _top_k_loss(q3, k3, win, precision)
    else:
        rows = int(block_rows) if keep_scores else max(1, int(block_rows) // q3.shape[0])
        per_query = _select_loss(q3, k3, win, rows, precision, bool(keep_scores))
    return jnp.mean(per_query, axis=-1).reshape(batch)
