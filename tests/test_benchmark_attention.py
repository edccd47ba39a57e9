"""benchmarks/attention.py: a run's JSON can be plotted again without running anything; the looped case."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention
from enlca_jax import attention as enla


def test_replot_draws_a_saved_run(tmp_path):
    cases = (("ENLA fwd+bwd", 1e-6, 0.02), ("exact fwd+bwd", 1e-5, 0.1))
    rows = [
        {"n": n, "case": case, "seconds": seconds * n, "xla_mib": mib * n}
        for n in (1024, 4096)
        for case, seconds, mib in cases
    ]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"batch": 4, "machine": {"device_kind": "test device"}, "rows": rows}))
    out = tmp_path / "plot.png"
    assert attention.main(["--replot", str(saved), "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_replot_without_a_destination_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        attention.main(["--replot", str(tmp_path / "run.json")])
    assert "--replot needs --plot" in capsys.readouterr().err


def test_in_one_call_chains_the_repetitions():
    # dq = 1e30 moves q by 1 per repetition (1e-30·dq), so the last dv shows how many ran before it.
    def grad_fn(q, k, v, f):
        return jnp.full_like(q, 1e30), jnp.zeros_like(k), v * jnp.sum(q) + f[0, 0]

    q, k, v, f = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.full((1, 1), 0.5)
    dv = jax.jit(attention.in_one_call(grad_fn, 5))(q, k, v, f)
    np.testing.assert_allclose(dv, np.full((2, 4), 4 * 6 + 0.5))  # q = 4 in the fifth repetition


def test_in_one_call_repeats_enla_unchanged():
    keys = jax.random.split(jax.random.key(0), 4)
    q, k = (jax.random.normal(key, (2, 16, 8)) * 0.5 for key in keys[:2])
    v = jax.random.normal(keys[2], (2, 16, 4))
    f = enla.orthogonal_random_matrix(keys[3], 16, 8)
    grad_fn = jax.grad(lambda *a: jnp.sum(enla.efficient_attention(*a) ** 2), argnums=(0, 1, 2))
    looped = jax.jit(attention.in_one_call(grad_fn, 3))(q, k, v, f)
    np.testing.assert_allclose(looped, grad_fn(q, k, v, f)[2], rtol=1e-6, atol=1e-7)


def test_a_looped_row_is_rated_per_repetition_on_the_given_count(monkeypatch):
    # Three timed calls of 2 s each; the host counters advance by 60 page faults and 0.6 s of kernel time.
    monkeypatch.setattr(attention.common, "time_fn", lambda fn, **kwargs: [fn(), fn(), fn(), 2.0][-1])
    usage = iter(
        [types.SimpleNamespace(ru_minflt=100, ru_stime=1.0), types.SimpleNamespace(ru_minflt=160, ru_stime=1.6)]
    )
    monkeypatch.setattr(attention.resource, "getrusage", lambda who: next(usage))
    x = jnp.ones((8, 8))
    row = attention.measure("looped", lambda x: x @ x, (x,), repeats=2, min_seconds=0.0, repetitions=4, flops=1e9)
    assert row["seconds"] == 0.5
    assert row["gflop"] == 1.0 and row["gflops_per_s"] == 2.0
    assert row["repetitions_per_call"] == 4
    assert row["minor_faults_per_call"] == 20 and row["kernel_seconds_per_call"] == pytest.approx(0.2)
