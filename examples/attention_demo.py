"""A short demo of ENLA on real image features: error against exact attention, and time.

    python examples/attention_demo.py

Embeds a natural image (scikit-image's 'astronaut', shipped in its wheel) with a random 1x1
conv, runs one ENLCA block's attention with exact softmax attention and with ENLA at several
numbers of random features M, and prints the relative error and the time of each.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from skimage import data, transform

from enlca_jax import attention, cpu


def main() -> None:
    image = transform.resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32)
    x = jnp.asarray(image)[None]  # [1, 64, 64, 3]
    features = jax.random.normal(jax.random.key(0), (3, 64)) @ jnp.eye(64)  # lift RGB to 64 channels
    h = jnp.tanh(x @ features)  # [1, 64, 64, 64]
    print(f"ENLA vs exact softmax attention on {h.shape[1]}x{h.shape[2]} positions (N = {64 * 64})")
    print(f"{'k':>4} {'M':>6} {'rel. error':>11} {'ENLA ms':>9} {'exact ms':>9}")
    block = attention.ENLCA(num_features=128)
    variables = block.init(jax.random.key(1), h)
    q, k, v, _ = block.apply(variables, h, method=attention.ENLCA.embed)
    for amplification in (1.0, 6.0):
        scale = math.sqrt(amplification / 6.0)
        qa, ka = q * scale, k * scale
        exact_fn = jax.jit(attention.softmax_attention)
        exact = exact_fn(qa, ka, v).block_until_ready()
        start = time.perf_counter()
        exact = exact_fn(qa, ka, v).block_until_ready()
        exact_ms = 1e3 * (time.perf_counter() - start)
        for m in (32, 128, 512):
            projection = attention.orthogonal_random_matrix(jax.random.key(m), m, q.shape[-1])
            enla_fn = jax.jit(attention.efficient_attention)
            enla_fn(qa, ka, v, projection).block_until_ready()
            start = time.perf_counter()
            out = enla_fn(qa, ka, v, projection).block_until_ready()
            enla_ms = 1e3 * (time.perf_counter() - start)
            error = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
            print(f"{amplification:4.0f} {m:6d} {error:11.3f} {enla_ms:9.2f} {exact_ms:9.2f}")


if __name__ == "__main__":
    cpu.setup()  # XLA:CPU flags where it computes on the CPU; nothing elsewhere
    main()
