"""ENLA and contrastive sparse aggregation: the pure math and the `ENLCA` Flax module.

This module is the public entry point other Flax projects import::

    from enlca_jax import attention
    block = attention.ENLCA()                      # authors' defaults
    variables = block.init(jax.random.key(0), x)   # x: [B, H, W, C]
    y = block.apply(variables, x)                  # [B, H, W, C]

Shape letters: B batch (any number of leading axes ``...``), N query positions, L key positions,
D embedding width (Q/K channels), Cv value width, M random features.

Everything follows the authors' PyTorch code (Zj-BinXia/ENLCA, ``src/model/ENLA.py`` and
``src/model/attention.py``); see the docstrings for the few places that add an opt-in option.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from enlca_jax import exact_attention
from enlca_jax.contrastive import contrastive_counts, contrastive_loss

Array = jax.Array
Dtype = Any
PrecisionLike = Any

__all__ = [
    "orthogonal_random_matrix",
    "gaussian_random_matrix",
    "random_matrix",
    "softmax_kernel_features",
    "key_summary",
    "attend_with_summary",
    "KeySummary",
    "KeySet",
    "combine_summaries",
    "efficient_attention",
    "softmax_attention",
    "contrastive_counts",
    "contrastive_loss",
    "l2_normalize",
    "redraw_random_features",
    "ENLCA",
    "sum_contrastive_losses",
    "FEATURE_COLLECTION",
    "LOSS_COLLECTION",
]

#: Variable collection that holds each block's random matrix F (never trained).
FEATURE_COLLECTION = "random_features"
#: Collection into which `ENLCA` sows its contrastive loss in training mode.
LOSS_COLLECTION = "losses"


# --------------------------------------------------------------------------------------------
# Random matrices
# --------------------------------------------------------------------------------------------


def _check_matrix_args(num_features: int, dim: int) -> None:
    if int(num_features) != num_features or num_features <= 0:
        raise ValueError(f"num_features (M) must be a positive integer, got {num_features!r}.")
    if int(dim) != dim or dim <= 0:
        raise ValueError(f"dim (D) must be a positive integer, got {dim!r}.")


def orthogonal_random_matrix(key: Array, num_features: int, dim: int, dtype: Dtype = jnp.float32) -> Array:
    """The authors' orthogonal random features ``gaussian_orthogonal_random_matrix(scaling=0)``.

    ``ceil(M / D)`` blocks, each the transpose of the Q factor of the QR decomposition of a fresh
    D×D standard-normal matrix (rows orthonormal within a block), stacked and cut to M rows; then
    row i is multiplied by the norm of a fresh D-dim standard-normal vector, so row norms follow
    chi(D) exactly as the rows of a Gaussian matrix do.

    Args:
      key: PRNG key.
      num_features: M, number of random features (rows), > 0.
      dim: D, embedding width (columns), > 0.
      dtype: output dtype (sampling is done in float32).

    Returns:
      F: [M, D].
    """
    _check_matrix_args(num_features, dim)
    num_blocks = -(-num_features // dim)
    block_key, norm_key = jax.random.split(key)
    gaussians = jax.random.normal(block_key, (num_blocks, dim, dim), jnp.float32)
    q, _ = jnp.linalg.qr(gaussians)  # q: [blocks, D, D], orthonormal columns
    rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]  # [M, D]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32), axis=1)
    return (norms[:, None] * rows).astype(dtype)


def gaussian_random_matrix(key: Array, num_features: int, dim: int, dtype: Dtype = jnp.float32) -> Array:
    """iid standard-normal random features (the paper's f ~ N(0, I_D)).

    Args:
      key: PRNG key.
      num_features: M, > 0.
      dim: D, > 0.
      dtype: output dtype.

    Returns:
      F: [M, D].
    """
    _check_matrix_args(num_features, dim)
    return jax.random.normal(key, (num_features, dim), jnp.float32).astype(dtype)


_MATRIX_FNS = {"orthogonal": orthogonal_random_matrix, "iid": gaussian_random_matrix}


def random_matrix(
    key: Array, num_features: int, dim: int, kind: str = "orthogonal", dtype: Dtype = jnp.float32
) -> Array:
    """``orthogonal_random_matrix`` or ``gaussian_random_matrix`` chosen by ``kind``.

    Returns:
      F: [M, D].
    """
    if kind not in _MATRIX_FNS:
        raise ValueError(f"feature kind must be one of {sorted(_MATRIX_FNS)}, got {kind!r}.")
    return _MATRIX_FNS[kind](key, num_features, dim, dtype)


# --------------------------------------------------------------------------------------------
# Feature map and attention
# --------------------------------------------------------------------------------------------


def _check_projection(x: Array, projection: Array, name: str) -> None:
    if projection.ndim != 2:
        raise ValueError(f"projection must be [M, D], got shape {projection.shape}.")
    if projection.shape[0] <= 0:
        raise ValueError(f"projection has M = {projection.shape[0]} features; M must be > 0.")
    if x.ndim < 2 or x.shape[-1] != projection.shape[1]:
        raise ValueError(
            f"{name} must be [..., N, D] with D = projection.shape[1] = {projection.shape[1]}, "
            f"got {name}.shape = {x.shape}."
        )


def _feature_dtype(x: Array) -> Dtype:
    """float32 at least: exp(F x - |x|^2/2) reaches e^20 at amplification 6 (beyond fp16)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def softmax_kernel_features(
    x: Array,
    projection: Array,
    *,
    eps: float = 1e-4,
    stabilizer: str | None = None,
    precision: PrecisionLike = None,
) -> Array:
    """Positive random features for the softmax kernel, exactly as the authors compute them.

    ``phi(x) = (exp(F x - |x|^2 / 2) + eps) / sqrt(M)``, so that
    ``E[phi(q) . phi(k)] = exp(q . k)`` when ``eps = 0`` and F has N(0, I) rows.

    Computed in float32 (or wider) whatever the input dtype, and returned in that dtype.

    Args:
      x: [..., N, D] queries or keys.
      projection: F, [M, D].
      eps: added after the exponential (authors: 1e-4); keeps every feature positive.
      stabilizer: None (authors' code, default), ``'row'`` or ``'global'``. Subtracts a constant
        ``c`` before the exponential and scales ``eps`` by ``exp(-c)``, i.e. returns
        ``exp(-c) * phi(x)`` exactly. With ``'row'`` c is the max over M for each position
        (use for queries: a per-query factor cancels between numerator and denominator of
        the attention ratio); with ``'global'`` c is the max over N and M for each example
        (use for keys: one factor for all keys cancels too); c is at least log(eps), so that
        ``eps·exp(-c)`` cannot overflow either. ``c`` is not differentiated (it cancels, so
        gradients of the attention are unchanged).
      precision: precision of the F x contraction.

    Returns:
      phi: [..., N, M], dtype float32 (or wider).
    """
    features, _ = _features_and_shift(x, projection, eps, stabilizer, precision)
    return features


def _features_and_shift(
    x: Array, projection: Array, eps: float, stabilizer: str | None, precision: PrecisionLike
) -> tuple[Array, Array]:
    """`softmax_kernel_features` and its (non-differentiated) shift c: [..., N, M] and [..., N|1, 1]."""
    _check_projection(x, projection, "x")
    dtype = _feature_dtype(x)
    x = x.astype(dtype)
    num_features = projection.shape[0]
    proj = jnp.einsum("...nd,md->...nm", x, projection.astype(dtype), precision=precision)
    logits = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)  # [..., N, M]
    if stabilizer is None:
        features = jnp.exp(logits) + eps
        shift = jnp.zeros(logits.shape[:-2] + (1, 1), dtype)
    else:
        if stabilizer == "row":
            shift = jnp.max(logits, axis=-1, keepdims=True)  # [..., N, 1]
        elif stabilizer == "global":
            shift = jnp.max(logits, axis=(-2, -1), keepdims=True)  # [..., 1, 1]
        else:
            raise ValueError(f"stabilizer must be None, 'row' or 'global', got {stabilizer!r}.")
        if eps > 0:
            # c ≥ log(eps) bounds eps·exp(-c) by 1: where every logit is very negative (large
            # ‖x‖), the max alone would make eps·exp(-c) overflow.
            shift = jnp.maximum(shift, math.log(eps))
        shift = lax.stop_gradient(shift)
        # exp(-c) * (exp(logits) + eps): the factor exp(-c) cancels in the attention ratio.
        features = jnp.exp(logits - shift) + eps * jnp.exp(-shift)
    return features / math.sqrt(num_features), shift


def _features_vjp(
    x: Array, projection: Array, features: Array, shift: Array, d_features: Array, eps: float, precision: PrecisionLike
) -> tuple[Array, Array]:
    """Cotangents of x [..., N, D] and F [M, D] given those of the features [..., N, M].

    phi = (exp(l - c) + eps·exp(-c)) / sqrt(M) with l = F x - |x|²/2 and c constant, so
    dl = dphi · (phi - eps·exp(-c)/sqrt(M)), dx = dl F - x Σ_m dl, dF = Σ dlᵀ x.
    """
    dtype = features.dtype
    x32 = x.astype(dtype)
    d_logits = d_features * (features - eps * jnp.exp(-shift) / math.sqrt(projection.shape[0]))
    dx = jnp.einsum("...nm,md->...nd", d_logits, projection.astype(dtype), precision=precision)
    dx = dx - x32 * jnp.sum(d_logits, axis=-1, keepdims=True)
    d_projection = jnp.einsum("...nm,...nd->md", d_logits, x32, precision=precision)
    return dx.astype(x.dtype), d_projection.astype(projection.dtype)


def _check_qkv(q: Array, k: Array, v: Array, mask: Array | None) -> None:
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(
            f"q, k, v must be [..., N, D], [..., L, D], [..., L, Cv]; got shapes {q.shape}, {k.shape}, {v.shape}."
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k embedding widths differ: q {q.shape}, k {k.shape}.")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions L: k {k.shape}, v {v.shape}.")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"q, k, v leading (batch) axes differ: {q.shape[:-2]}, {k.shape[:-2]}, {v.shape[:-2]}.")
    if mask is not None and tuple(mask.shape) != tuple(k.shape[:-1]):
        raise ValueError(f"mask must be [..., L] = {k.shape[:-1]} (keys), got {mask.shape}.")


def key_summary(
    k: Array,
    v: Array,
    projection: Array,
    *,
    mask: Array | None = None,
    eps: float = 1e-4,
    stabilizer: str | None = None,
    precision: PrecisionLike = None,
) -> tuple[Array, Array]:
    """The two sums ENLA needs from the keys: ``phi(K)^T V`` and ``phi(K)^T 1``.

    They are additive over key positions, so summaries of several tiles of one image can be
    added to get the summary of the whole image (global attention at bounded memory).

    Args:
      k: [..., L, D] keys.
      v: [..., L, Cv] values.
      projection: F, [M, D].
      mask: optional [..., L] bool, False for padded keys (left out of both sums).
      eps, stabilizer, precision: as in `softmax_kernel_features` (``'global'`` for keys; a
        stabilised summary carries its own factor, so only unstabilised ones add across tiles).

    Returns:
      kv: [..., M, Cv] and k_sum: [..., M], float32 (or wider).
    """
    _check_projection(k, projection, "k")
    if k.shape[-2] != v.shape[-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"k [..., L, D] and v [..., L, Cv] disagree: k {k.shape}, v {v.shape}.")
    if mask is not None and tuple(mask.shape) != tuple(k.shape[:-1]):
        raise ValueError(f"mask must be [..., L] = {k.shape[:-1]} (keys), got {mask.shape}.")
    phi_k = softmax_kernel_features(k, projection, eps=eps, stabilizer=stabilizer, precision=precision)  # [..., L, M]
    if mask is not None:
        phi_k = jnp.where(mask[..., None], phi_k, 0.0)
    kv = jnp.einsum("...lm,...lc->...mc", phi_k, v.astype(phi_k.dtype), precision=precision)
    k_sum = jnp.sum(phi_k, axis=-2)  # [..., M]
    return kv, k_sum


def attend_with_summary(
    q: Array,
    summary: tuple[Array, Array],
    projection: Array,
    *,
    eps: float = 1e-4,
    stabilizer: str | None = None,
    precision: PrecisionLike = None,
) -> Array:
    """ENLA output for queries ``q`` given a `key_summary` ``(kv, k_sum)``.

    ``out_i = phi(Q_i)^T kv / (phi(Q_i) . k_sum)`` (no eps in the denominator, as the authors:
    every feature is at least eps / sqrt(M) > 0).

    Args:
      q: [..., N, D].
      summary: (kv [..., M, Cv], k_sum [..., M]).
      projection: F, [M, D].
      stabilizer: None or ``'row'`` (a per-query factor, cancelled by the ratio).

    Returns:
      out: [..., N, Cv] float32 (or wider).
    """
    kv, k_sum = summary
    phi_q = softmax_kernel_features(q, projection, eps=eps, stabilizer=stabilizer, precision=precision)  # [..., N, M]
    numerator = jnp.einsum("...nm,...mc->...nc", phi_q, kv, precision=precision)  # [..., N, Cv]
    denominator = jnp.einsum("...nm,...m->...n", phi_q, k_sum, precision=precision)  # [..., N]
    return numerator / denominator[..., None]


def efficient_attention(
    q: Array,
    k: Array,
    v: Array,
    projection: Array,
    *,
    mask: Array | None = None,
    eps: float = 1e-4,
    stabilize: bool = False,
    precision: PrecisionLike = None,
) -> Array:
    """ENLA: ``D^-1 phi(Q) (phi(K)^T V)``, linear in the number of positions.

    Approximates ``softmax_j(q_i . k_j) v_j`` (no 1/sqrt(D) scaling: the ENLCA module sets the
    scale through the norm of q and k). Never forms an N×L array: cost O((N + L)·M·(D + Cv)).

    Args:
      q: [..., N, D] queries.
      k: [..., L, D] keys.
      v: [..., L, Cv] values.
      projection: F, [M, D] (e.g. from `orthogonal_random_matrix`).
      mask: optional [..., L] bool; False marks padded keys, which get no weight.
      eps: feature-map eps (authors: 1e-4).
      stabilize: subtract a per-query max (queries) and a per-example max (keys) inside the
        exponentials; both cancel in the ratio, so the result equals the unstabilised one up
        to rounding, but cannot overflow at large amplification or in low precision.
        Off by default, as in the authors' code.
      precision: precision of the contractions.

    Returns:
      out: [..., N, Cv] in the dtype of ``v``.

    Differentiable in q, k, v and F with a hand-written backward that keeps no [N, Cv] array
    besides the cotangent (the N×M feature maps are recomputed): the same gradients as autodiff,
    in less memory.
    """
    _check_qkv(q, k, v, mask)
    _check_projection(q, projection, "q")
    return _enla(q, k, v, projection, mask, eps, stabilize, precision).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _enla(q, k, v, projection, mask, eps, stabilize, precision):
    out, _ = _enla_fwd(q, k, v, projection, mask, eps, stabilize, precision)
    return out


def _enla_fwd(q, k, v, projection, mask, eps, stabilize, precision):
    """ENLA forward; keeps only the inputs and the small sums (kv, k_sum, 1/den) for the backward."""
    summary = key_summary(
        k, v, projection, mask=mask, eps=eps, stabilizer="global" if stabilize else None, precision=precision
    )
    kv, k_sum = summary
    phi_q, _ = _features_and_shift(q, projection, eps, "row" if stabilize else None, precision)
    numerator = jnp.einsum("...nm,...mc->...nc", phi_q, kv, precision=precision)  # [..., N, Cv]
    inv_den = 1.0 / jnp.einsum("...nm,...m->...n", phi_q, k_sum, precision=precision)  # [..., N]
    return numerator * inv_den[..., None], (q, k, v, projection, mask, kv, k_sum, inv_den)


def _enla_bwd(eps, stabilize, precision, residuals, g):
    """Backward of ``out = phi_q kv / (phi_q · k_sum)`` with only N×M temporaries besides g.

    With G = g kvᵀ [N, M] and s = Σ_m phi_q G / den²: dphi_q = G / den - s k_sumᵀ,
    dkv = (phi_q / den)ᵀ g, dk_sum = -phi_qᵀ s, dphi_k = v dkvᵀ + dk_sum, dv = phi_k dkv.
    The feature maps are recomputed (cheaper than keeping two [N, M] arrays per call).
    """
    q, k, v, projection, mask, kv, k_sum, inv_den = residuals
    phi_q, shift_q = _features_and_shift(q, projection, eps, "row" if stabilize else None, precision)
    g = g.astype(phi_q.dtype)
    gk = jnp.einsum("...nc,...mc->...nm", g, kv, precision=precision)  # [..., N, M]
    s = jnp.sum(phi_q * gk, axis=-1) * inv_den * inv_den  # [..., N]
    d_phi_q = gk * inv_den[..., None] - s[..., None] * k_sum[..., None, :]
    d_kv = jnp.einsum("...nm,...nc->...mc", phi_q * inv_den[..., None], g, precision=precision)  # [..., M, Cv]
    d_k_sum = -jnp.einsum("...nm,...n->...m", phi_q, s, precision=precision)  # [..., M]
    dq, d_proj_q = _features_vjp(q, projection, phi_q, shift_q, d_phi_q, eps, precision)

    phi_k, shift_k = _features_and_shift(k, projection, eps, "global" if stabilize else None, precision)
    if mask is not None:
        phi_k = jnp.where(mask[..., None], phi_k, 0.0)
    d_phi_k = jnp.einsum("...lc,...mc->...lm", v.astype(phi_k.dtype), d_kv, precision=precision)
    d_phi_k = d_phi_k + d_k_sum[..., None, :]
    if mask is not None:
        d_phi_k = jnp.where(mask[..., None], d_phi_k, 0.0)
    dv = jnp.einsum("...lm,...mc->...lc", phi_k, d_kv, precision=precision).astype(v.dtype)
    dk, d_proj_k = _features_vjp(k, projection, phi_k, shift_k, d_phi_k, eps, precision)
    return dq, dk, dv, d_proj_q + d_proj_k, None


_enla.defvjp(_enla_fwd, _enla_bwd)


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None = None,
    *,
    mask: Array | None = None,
    precision: PrecisionLike = None,
    block_size: int | tuple[int, int] | None = None,
    **unused_kwargs: Any,
) -> Array:
    """Exact non-local attention ``softmax_j(q_i . k_j) v_j`` (NLA) in bounded memory.

    Same calling convention as `efficient_attention` so either can be an ``attention_fn``;
    ``projection`` and feature-map options are accepted and ignored. Queries and keys are taken
    in blocks with an online softmax, so no N×L array is formed, forward or backward
    (`enlca_jax.exact_attention`); time stays O(N·L).

    Args:
      q: [..., N, D]; k: [..., L, D]; v: [..., L, Cv].
      mask: optional [..., L] bool, False for padded keys.
      block_size: ``(block_q, block_k)`` or one int; None chooses them from the shapes
        (`exact_attention.block_sizes`).

    Returns:
      out: [..., N, Cv] in the dtype of ``v`` (computed in float32 or wider).
    """
    del projection, unused_kwargs
    _check_qkv(q, k, v, mask)
    out = exact_attention.blocked_softmax_attention(q, k, v, mask=mask, precision=precision, block_size=block_size)
    return out.astype(v.dtype)


class KeySummary(NamedTuple):
    """What ENLA needs from a set of keys, additive over key sets: kv [B, M, Cv], k_sum [B, M]."""

    kv: Array
    k_sum: Array


class KeySet(NamedTuple):
    """What exact attention needs from a set of keys: the keys themselves, k [B, L, D], v
    [B, L, Cv], mask [B, L] (concatenated over key sets)."""

    k: Array
    v: Array
    mask: Array


def combine_summaries(a: KeySummary | KeySet, b: KeySummary | KeySet) -> KeySummary | KeySet:
    """The summary of the union of two disjoint key sets (tiles of one image)."""
    if isinstance(a, KeySummary) and isinstance(b, KeySummary):
        return KeySummary(a.kv + b.kv, a.k_sum + b.k_sum)
    if isinstance(a, KeySet) and isinstance(b, KeySet):
        return KeySet(*(jnp.concatenate([x, y], axis=1) for x, y in zip(a, b, strict=True)))
    raise TypeError(f"cannot combine a {type(a).__name__} with a {type(b).__name__}.")


# --------------------------------------------------------------------------------------------
# Flax module
# --------------------------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int = -1, eps: float = 5e-5) -> Array:
    """``x / max(|x|_2, eps)`` along ``axis`` (torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def redraw_random_features(random_features: Any, key: Array, kind: str = "orthogonal") -> Any:
    """Fresh random matrices of the same shapes, one independent draw per ENLCA block.

    Pure function of the ``'random_features'`` collection and a key; training calls it every
    640 steps with ``jax.random.fold_in(feature_key, step)``, so every replica and a resumed
    run draw the same matrices.

    Args:
      random_features: pytree whose leaves are [M, D] matrices (a model's
        ``variables['random_features']``).
      key: PRNG key.
      kind: ``'orthogonal'`` (authors) or ``'iid'``.

    Returns:
      A pytree of the same structure with new [M, D] matrices.
    """
    leaves, treedef = jax.tree_util.tree_flatten(random_features)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [random_matrix(k, leaf.shape[0], leaf.shape[1], kind, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


class ENLCA(nn.Module):
    """Efficient non-local contrastive attention block (NHWC in, NHWC out).

    ``y = x + res_scale · attention(Q, K, V)`` with 1×1 convs Q, K: C → C/reduction and
    V: C → C; Q and K are L2-normalised over channels and multiplied by sqrt(amplification),
    so ``q·k = amplification · cos``. Attention is global over all H·W positions of each image.

    Variables: trainable convs in ``'params'`` (``query``, ``key``, ``value``); the random
    matrix F [num_features, C/reduction] in the ``'random_features'`` collection, drawn at
    ``init`` from the ``'random_features'`` rng stream (falling back to ``'params'``); it is
    never in ``'params'``, so no optimiser touches it.

    In training mode (``train=True``) the per-example contrastive loss [B] is sown into the
    ``'losses'`` collection under ``'contrastive'`` (ask for it with ``mutable=['losses']``).

    ``conv_general_dilated`` is handed to the 1×1 convs as ``flax.linen.Conv``'s field of that name
    (None: ``jax.lax.conv_general_dilated``); it changes how they run, not the parameters.
    """

    reduction: int = 4
    num_features: int = 128
    amplification: float = 6.0
    res_scale: float = 0.1
    feature_type: str = "orthogonal"
    attention_fn: Callable[..., Array] = efficient_attention
    normalize_eps: float = 5e-5
    contrastive_positive: int = 15
    contrastive_negative_start: int = 50
    contrastive_negative: int = 15
    #: If set, (n1, n2) fractions of H·W override the three counts above (paper: (0.02, 0.08)).
    contrastive_fractions: tuple[float, float] | None = None
    contrastive_margin: float = 1.0
    #: How the ranked windows are found: 'select' (exact order statistics, no sort) or 'top_k'.
    contrastive_method: str = "select"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Callable[..., Array] = nn.linear.default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    conv_general_dilated: Callable[..., Array] | None = None

    def _conv(self, features: int, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            conv_general_dilated=self.conv_general_dilated,
            name=name,
        )

    @nn.compact
    def embed(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """Q, K (normalised, amplified, float32), V and the random matrix F for x.

        Args:
          x: [B, H, W, C].

        Returns:
          q: [B, H·W, D], k: [B, H·W, D], v: [B, H·W, C] with D = ⌊C / reduction⌋, and
          F: [num_features, D] from the ``'random_features'`` collection.
        """
        if self.reduction <= 0 or self.amplification <= 0 or self.num_features <= 0:
            raise ValueError(
                "reduction, amplification and num_features must be > 0, got "
                f"{self.reduction}, {self.amplification}, {self.num_features}."
            )
        if x.ndim != 4:
            raise ValueError(f"ENLCA expects NHWC input [B, H, W, C], got shape {x.shape}.")
        channels = x.shape[-1]
        embed = channels // self.reduction  # floor, as the authors' channel // reduction
        if embed < 1:
            raise ValueError(f"channels C = {channels} must be at least reduction = {self.reduction}.")
        batch, height, width = x.shape[:3]
        q = self._conv(embed, "query")(x)
        k = self._conv(embed, "key")(x)
        v = self._conv(channels, "value")(x)
        scale = math.sqrt(self.amplification)
        # Normalise in float32 at least: bf16 embeddings would lose the cosine's precision.
        q = l2_normalize(q.astype(_feature_dtype(q)), eps=self.normalize_eps) * scale
        k = l2_normalize(k.astype(_feature_dtype(k)), eps=self.normalize_eps) * scale
        n = height * width
        projection = self.variable(
            FEATURE_COLLECTION,
            "projection",
            lambda: random_matrix(self.make_rng(FEATURE_COLLECTION), self.num_features, embed, self.feature_type),
        ).value
        return (
            q.reshape(batch, n, embed),
            k.reshape(batch, n, embed),
            v.reshape(batch, n, channels),
            projection,
        )

    def contrastive(self, q: Array, k: Array) -> Array:
        """Per-example contrastive loss [B] for embeddings q, k: [B, N, D]."""
        if self.contrastive_fractions is not None:
            counts = contrastive_counts(q.shape[-2], *self.contrastive_fractions)
        else:
            counts = (
                self.contrastive_positive,
                self.contrastive_negative_start,
                self.contrastive_negative,
            )
        return contrastive_loss(
            q,
            k,
            num_positive=counts[0],
            negative_start=counts[1],
            num_negative=counts[2],
            margin=self.contrastive_margin,
            precision=self.precision,
            method=self.contrastive_method,
        )

    def __call__(self, x: Array, *, train: bool = False, mask: Array | None = None) -> Array:
        """Apply the block.

        Args:
          x: [B, H, W, C].
          train: if True, sow the contrastive loss [B] into ``'losses'``.
          mask: optional [B, H, W] bool, False for padded pixels (left out as keys).

        Returns:
          [B, H, W, C], dtype of the convs' output (``dtype`` or that of x).
        """
        q, k, v, projection = self.embed(x)
        if train:
            self.sow(LOSS_COLLECTION, "contrastive", self.contrastive(q, k))
        key_mask = None
        if mask is not None:
            if mask.shape != x.shape[:3]:
                raise ValueError(f"mask must be [B, H, W] = {x.shape[:3]}, got {mask.shape}.")
            key_mask = mask.reshape(mask.shape[0], -1)
        out = self.attention_fn(q, k, v, projection, mask=key_mask, precision=self.precision)
        out = out.reshape(x.shape[:3] + (v.shape[-1],)).astype(v.dtype)
        return x.astype(v.dtype) + self.res_scale * out

    def summarize(self, x: Array, mask: Array | None = None) -> KeySummary | KeySet:
        """What this block's attention needs from the keys of x: [B, H, W, C] (mask [B, H, W]).

        For ENLA a `KeySummary` (the sums φ(K)ᵀV and φ(K)ᵀ1), for exact attention a `KeySet`
        (the keys and values). Summaries of the tiles of one image combine
        (`combine_summaries`) into that of the whole image, so `apply_with_summary` on every
        tile gives global attention exactly.
        """
        _, k, v, projection = self.embed(x)
        key_mask = jnp.ones(k.shape[:2], bool) if mask is None else mask.reshape(mask.shape[0], -1)
        if self.attention_fn is efficient_attention:
            return KeySummary(*key_summary(k, v, projection, mask=key_mask, precision=self.precision))
        if self.attention_fn is softmax_attention:
            return KeySet(k, v.astype(k.dtype), key_mask)
        raise ValueError(
            "summaries (tiled global attention) exist for attention_fn = efficient_attention (ENLA) or "
            f"softmax_attention (exact NLA), not {self.attention_fn!r}."
        )

    def apply_with_summary(self, x: Array, summary: KeySummary | KeySet) -> Array:
        """The block's output on x: [B, H, W, C] attending to the keys given by ``summary``."""
        q, _, v, projection = self.embed(x)
        if isinstance(summary, KeySet):
            out = softmax_attention(q, summary.k, summary.v, mask=summary.mask, precision=self.precision)
        else:
            out = attend_with_summary(q, tuple(summary), projection, precision=self.precision)
        out = out.reshape(x.shape[:3] + (v.shape[-1],)).astype(v.dtype)
        return x.astype(v.dtype) + self.res_scale * out


def sum_contrastive_losses(losses: Any) -> tuple[Array, int]:
    """Sum and count of the sown per-example contrastive losses of all ENLCA blocks.

    Args:
      losses: the ``'losses'`` collection returned by ``apply(..., mutable=['losses'])``.

    Returns:
      (sum over blocks of the [B] losses, number of blocks).
    """
    leaves = jax.tree_util.tree_leaves(losses)
    if not leaves:
        return jnp.zeros(()), 0
    return functools.reduce(jnp.add, leaves), len(leaves)
