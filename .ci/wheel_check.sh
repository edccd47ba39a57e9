#!/usr/bin/env bash
# The package as `pip install` gives it: build a wheel and install it with its declared runtime
# dependencies only into a fresh venv; import the attention and run an ENLCA block inside a small
# Flax model; then add the extra eval.py documents and run `eval.py --help`. Both run outside the
# checkout, so that the installed package, not the source tree, is imported.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
python3.11 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip
wheel=$(ls "$work"/dist/enlca_jax-*.whl)
"$work/venv/bin/pip" install --quiet "$wheel"
cp eval.py "$work/"
cd "$work"
JAX_PLATFORMS=cpu venv/bin/python - <<'PY'
import flax.linen as nn
import jax
import jax.numpy as jnp

import enlca_jax
from enlca_jax import attention

assert enlca_jax.__file__.startswith("venv/") or "/venv/" in enlca_jax.__file__, enlca_jax.__file__


class MyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3))(x)
        x = attention.ENLCA(num_features=32)(x, train=train)
        return nn.Conv(3, (3, 3))(x)


model = MyNet()
x = jnp.ones((2, 12, 12, 3))
variables = model.init({"params": jax.random.key(0), "random_features": jax.random.key(1)}, x)
y, aux = model.apply(variables, x, train=True, mutable=["losses"])
total, count = attention.sum_contrastive_losses(aux["losses"])
assert y.shape == x.shape and total.shape == (2,) and count == 1 and bool(jnp.isfinite(total).all())
print("wheel: ENLCA block inside a Flax model OK, from", enlca_jax.__file__)
PY
venv/bin/pip install --quiet "$wheel[eval]"
# absl ends --help with exit status 1; what counts is that the help (every flag) was printed.
JAX_PLATFORMS=cpu venv/bin/python eval.py --help > help.txt 2>&1 || true
grep -q -- "--workdir: Training workdir" help.txt || { cat help.txt; exit 1; }
echo "wheel: eval.py --help OK with enlca_jax[eval]"
