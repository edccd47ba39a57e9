"""Estimator variance versus the number of random features m and the amplification k.

    python experiments/variance.py --output experiments/results            # default grid, a few minutes
    python experiments/variance.py --quick --output /tmp/variance          # about a minute

For m in {8 … 1024}, k in {1, 2, 4, 6, 8, 12}, iid and orthogonal features, over many PRNG keys
(vmapped), on synthetic unit-vector pairs and on real feature statistics (Q/K of natural-image
patches through a randomly initialised ENLCA block, rescaled to amplification k), it measures:

1. ``kernel_bias`` / ``kernel_variance``: bias and variance of φ(q)ᵀφ(k) relative to exp(qᵀk)
   (eps = 0), against the closed form for iid features, Var/exp(qᵀk)² = (exp(‖q+k‖²) − 1)/m;
2. ``attention_error``: the relative error of `efficient_attention` against `softmax_attention`
   per query (mean and 95th percentile), on image features;
3. ``grad_bias`` / ``grad_variance`` (w.r.t. q, k and the ENLCA block's parameters): of the
   gradient of a fixed linear loss through ENLA, relative to the exact-attention gradient.

Writes ``variance.json`` (one record per measurement: quantity, data, m, k, features, measured,
theory where a closed form exists, draws) and two plots: ``variance_vs_m.png`` (log-log, with the
theory lines) and ``error_vs_k.png`` (attention error at m = 128).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from enlca_jax import attention, cpu, models  # noqa: E402

KINDS = ("iid", "orthogonal")


@dataclasses.dataclass(frozen=True)
class Grid:
    ms: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    ks: tuple[float, ...] = (1, 2, 4, 6, 8, 12)
    kernel_draws: int = 1000  # random matrices per (m, k, kind) for the kernel estimator
    pairs: int = 32  # (q, k) pairs per data source
    attention_draws: int = 32  # random matrices for the attention error
    grad_draws: int = 64  # random matrices for the gradient statistics
    grad_ms: tuple[int, ...] = (32, 128, 512)
    grad_ks: tuple[float, ...] = (1, 6)
    dim: int = 64  # embedding width D (authors: 256 / 4)
    patch: int = 24  # image patch side: N = patch² positions for attention


QUICK = Grid(ms=(8, 32, 128, 512), ks=(1, 6, 12), kernel_draws=500, pairs=16, attention_draws=8, grad_draws=16,
             grad_ms=(32, 128), grad_ks=(1, 6), patch=16)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Data: unit-norm query/key directions (the amplification is applied per k)
# ---------------------------------------------------------------------------------------------


def synthetic_pairs(key: jax.Array, count: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """Random unit vectors u, w [count, D] (independent directions, as in high-dimensional noise)."""
    a, b = jax.random.normal(key, (2, count, dim))
    return attention.l2_normalize(a), attention.l2_normalize(b)


def image_block(patch: int, dim: int) -> tuple[attention.ENLCA, dict, jax.Array]:
    """A randomly initialised ENLCA block (PyTorch init, as the authors) and its input features.

    The input is a natural-image patch (scikit-image's astronaut) embedded by a random 3×3 conv
    head with C = 4·D channels, i.e. the statistics an ENLCA block sees at initialisation.
    """
    from skimage import data, transform  # noqa: PLC0415

    image = transform.resize(data.astronaut(), (patch * 4, patch * 4), anti_aliasing=True)
    image = transform.resize(image[patch : patch * 3, patch : patch * 3], (patch, patch), anti_aliasing=True)
    x = jnp.asarray(image, jnp.float32)[None]  # [1, p, p, 3]
    channels = 4 * dim
    head = models.pytorch_kernel_init()(jax.random.key(10), (3, 3, 3, channels))
    features = jax.lax.conv_general_dilated(x - 0.45, head, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    block = attention.ENLCA(
        num_features=128, kernel_init=models.pytorch_kernel_init(), bias_init=models.pytorch_bias_init(channels)
    )
    variables = block.init(jax.random.key(11), features)
    return block, variables, features


def image_directions(block, variables, features) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unit-norm q, k [N, D] and v [N, C] of the block's input."""
    q, k, v, _ = block.apply(variables, features, method=attention.ENLCA.embed)
    scale = math.sqrt(block.amplification)
    return q[0] / scale, k[0] / scale, v[0]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("m", "kind"))
def _kernel_ratios(keys, q, k, m, kind):
    """φ(q)·φ(k) / exp(q·k) for each key and pair: [draws, P] (compiled once per m, kind)."""
    target = jnp.exp(jnp.sum(q * k, -1))  # [P]

    def estimate(draw_key):
        f = attention.random_matrix(draw_key, m, q.shape[-1], kind)
        phi_q = attention.softmax_kernel_features(q, f, eps=0.0)
        phi_k = attention.softmax_kernel_features(k, f, eps=0.0)
        return jnp.sum(phi_q * phi_k, -1) / target

    return jax.vmap(estimate)(keys)


def kernel_statistics(u, w, amplification, m, kind, draws, key):
    """Relative bias and variance of φ(q)·φ(k) / exp(q·k) per pair, over ``draws`` matrices.

    Returns (bias [P], variance [P], theory variance [P]) with q = √k·u, k = √k·w.
    """
    q, k = math.sqrt(amplification) * u, math.sqrt(amplification) * w
    ratios = np.asarray(_kernel_ratios(jax.random.split(key, draws), q, k, m=m, kind=kind), np.float64)
    theory = (np.exp(np.sum(np.asarray(q + k, np.float64) ** 2, -1)) - 1) / m
    return ratios.mean(0) - 1.0, ratios.var(0, ddof=1), theory


@functools.partial(jax.jit, static_argnames=("m", "kind"))
def _attention_errors(keys, q, k, v, m, kind):
    exact = attention.softmax_attention(q, k, v)

    def error(draw_key):
        f = attention.random_matrix(draw_key, m, q.shape[-1], kind)
        out = attention.efficient_attention(q, k, v, f)
        return jnp.linalg.norm(out - exact, axis=-1) / jnp.linalg.norm(exact, axis=-1)

    return jax.vmap(error)(keys)


def attention_errors(q, k, v, m, kind, draws, key):
    """Per-query relative error ‖ENLA_i − softmax_i‖ / ‖softmax_i‖, [draws, N]."""
    return np.asarray(_attention_errors(jax.random.split(key, draws), q, k, v, m=m, kind=kind))


def gradient_statistics(block, variables, features, amplification, m, kind, draws, key):
    """Relative bias and variance of ENLA gradients (w.r.t. q, k, params) against exact attention."""
    scale = math.sqrt(amplification / block.amplification)
    weights = jax.random.normal(jax.random.key(12), (features.shape[1] * features.shape[2], features.shape[-1]))

    def loss(params, q_in, k_in, f, attention_fn):
        q_emb, k_emb, v, _ = block.apply({**variables, "params": params}, features, method=attention.ENLCA.embed)
        q_emb, k_emb = (q_emb[0] + q_in) * scale, (k_emb[0] + k_in) * scale
        return jnp.sum(attention_fn(q_emb, k_emb, v[0], f) * weights)

    zeros = jnp.zeros((features.shape[1] * features.shape[2], features.shape[-1] // block.reduction))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    exact = grad(variables["params"], zeros, zeros, None, attention.softmax_attention)

    @jax.jit
    @jax.vmap
    def sample(draw_key):
        f = attention.random_matrix(draw_key, m, zeros.shape[-1], kind)
        return grad(variables["params"], zeros, zeros, f, attention.efficient_attention)

    samples = sample(jax.random.split(key, draws))
    results = {}
    for name, index in (("q", 1), ("k", 2), ("params", 0)):
        exact_flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(exact[index])])
        flat = np.concatenate(
            [np.asarray(x).reshape(draws, -1) for x in jax.tree_util.tree_leaves(samples[index])], axis=1
        )
        norm = np.sum(exact_flat**2)
        mean = flat.mean(0)
        results[name] = (
            float(np.sqrt(np.sum((mean - exact_flat) ** 2) / norm)),
            float(np.mean(np.sum((flat - mean) ** 2, axis=1)) / norm),
        )
    return results


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def stable_seed(*parts) -> int:
    """A seed from the parts that is the same in every run (Python's hash() of str is not)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def run(grid: Grid, seed: int = 0) -> list[dict]:
    records: list[dict] = []
    key = jax.random.key(seed)
    block, variables, features = image_block(grid.patch, grid.dim)
    q_img, k_img, v_img = image_directions(block, variables, features)
    pick = jax.random.choice(jax.random.key(seed + 1), q_img.shape[0], (2, grid.pairs), replace=False)
    sources = {
        "synthetic": synthetic_pairs(jax.random.fold_in(key, 1), grid.pairs, grid.dim),
        "image": (q_img[pick[0]], k_img[pick[1]]),
    }
    for data, (u, w) in sources.items():
        for amplification in grid.ks:
            for m in grid.ms:
                for kind in KINDS:
                    sub = jax.random.fold_in(key, stable_seed(data, amplification, m, kind))
                    bias, variance, theory = kernel_statistics(u, w, amplification, m, kind, grid.kernel_draws, sub)
                    common = {"data": data, "m": m, "k": amplification, "features": kind, "draws": grid.kernel_draws}
                    records.append({"quantity": "kernel_bias", **common, "measured": float(np.mean(bias)),
                                    "theory": 0.0 if kind == "iid" else None})  # fmt: skip
                    records.append({"quantity": "kernel_variance", **common, "measured": float(np.mean(variance)),
                                    "theory": float(np.mean(theory)) if kind == "iid" else None,
                                    "measured_median_pair": float(np.median(variance))})  # fmt: skip
    for amplification in grid.ks:
        q, k = math.sqrt(amplification) * q_img, math.sqrt(amplification) * k_img
        for m in grid.ms:
            for kind in KINDS:
                sub = jax.random.fold_in(key, stable_seed("attention", amplification, m, kind))
                errors = attention_errors(q, k, v_img, m, kind, grid.attention_draws, sub)
                common = {"data": "image", "m": m, "k": amplification, "features": kind, "draws": grid.attention_draws}
                records.append({"quantity": "attention_error_mean", **common, "measured": float(errors.mean()),
                                "theory": None})  # fmt: skip
                records.append({"quantity": "attention_error_p95", **common,
                                "measured": float(np.percentile(errors, 95)), "theory": None})  # fmt: skip
    for amplification in grid.grad_ks:
        for m in grid.grad_ms:
            for kind in KINDS:
                sub = jax.random.fold_in(key, stable_seed("grad", amplification, m, kind))
                stats = gradient_statistics(block, variables, features, amplification, m, kind, grid.grad_draws, sub)
                common = {"data": "image", "m": m, "k": amplification, "features": kind, "draws": grid.grad_draws}
                for name, (bias, variance) in stats.items():
                    records.append({"quantity": f"grad_bias_{name}", **common, "measured": bias, "theory": None})
                    records.append({"quantity": f"grad_variance_{name}", **common, "measured": variance,
                                    "theory": None})  # fmt: skip
    return records


def select(records, **where):
    return [r for r in records if all(r.get(key) == value for key, value in where.items())]


def summary(records: list[dict]) -> dict[str, float]:
    """The numbers the README quotes (k = 6, m = 128 where present)."""
    out = {}
    for kind in KINDS:
        hit = select(records, quantity="attention_error_mean", k=6, m=128, features=kind)
        if hit:
            out[f"attention_error_k6_m128_{kind}"] = hit[0]["measured"]
        var = select(records, quantity="kernel_variance", data="synthetic", k=1, m=128, features=kind)
        if var:
            out[f"kernel_variance_k1_m128_{kind}"] = var[0]["measured"]
    if "attention_error_k6_m128_iid" in out:
        out["orthogonal_gain_k6_m128"] = out["attention_error_k6_m128_iid"] / out["attention_error_k6_m128_orthogonal"]
    slopes = {}
    for kind in KINDS:
        points = select(records, quantity="kernel_variance", data="synthetic", k=1, features=kind)
        if len(points) > 1:
            slopes[kind] = float(
                np.polyfit(np.log([p["m"] for p in points]), np.log([p["measured"] for p in points]), 1)[0]
            )
    out.update({f"variance_slope_k1_{kind}": value for kind, value in slopes.items()})
    return out


def plot(records: list[dict], output: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ks = sorted({r["k"] for r in records if r["quantity"] == "kernel_variance"})
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for index, amplification in enumerate(k for k in ks if k in (1, 2, 6)):
        color = f"C{index}"
        iid = select(records, quantity="kernel_variance", data="synthetic", k=amplification, features="iid")
        ortho = select(records, quantity="kernel_variance", data="synthetic", k=amplification, features="orthogonal")
        ms = [r["m"] for r in iid]
        ax.loglog(ms, [r["theory"] for r in iid], "-", color=color, label=f"k={amplification:g} theory (iid)")
        ax.loglog(ms, [r["measured"] for r in iid], "o", color=color, label=f"k={amplification:g} iid")
        ax.loglog([r["m"] for r in ortho], [r["measured"] for r in ortho], "x", color=color,
                  label=f"k={amplification:g} orthogonal")  # fmt: skip
    ax.set_xlabel("random features m")
    ax.set_ylabel("Var[φ(q)·φ(k)] / exp(q·k)²")
    ax.set_title("Kernel estimator variance (synthetic unit vectors ×√k)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "variance_vs_m.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for kind in KINDS:
        for quantity, style in (("attention_error_mean", "-o"), ("attention_error_p95", "--x")):
            points = select(records, quantity=quantity, m=128, features=kind)
            label = f"{kind}, {'mean' if quantity.endswith('mean') else '95th pct'}"
            ax.plot([p["k"] for p in points], [p["measured"] for p in points], style, label=label)
    ax.set_xlabel("amplification k")
    ax.set_ylabel("‖ENLA − softmax‖ / ‖softmax‖ per query")
    ax.set_yscale("log")
    ax.set_title("ENLA error against exact attention, m = 128 (image features)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "error_vs_k.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="experiments/results", help="folder for variance.json and the plots")
    parser.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else Grid()
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    records = run(grid, args.seed)
    result = {"grid": dataclasses.asdict(grid), "seconds": time.time() - start, "jax": jax.__version__,
              "device_kind": jax.devices()[0].device_kind, "summary": summary(records), "records": records}  # fmt: skip
    (output / "variance.json").write_text(json.dumps(result, indent=1))
    plot(records, output)
    for key, value in result["summary"].items():
        print(f"{key}: {value:.4g}")
    print(f"{len(records)} records in {result['seconds']:.0f} s; wrote {output}/variance.json and plots")
    return 0


if __name__ == "__main__":
    cpu.setup()  # XLA:CPU flags where it computes on the CPU; nothing elsewhere
    sys.exit(main())
