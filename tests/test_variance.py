"""experiments/variance.py: the kernel estimator's measured variance follows the closed form and 1/m."""

import math

import jax
import numpy as np

from experiments import variance


def test_variance_matches_closed_form_and_slope():
    u, w = variance.synthetic_pairs(jax.random.key(0), 8, 16)
    amplification, draws = 0.5, 4000
    s2 = np.sum((math.sqrt(amplification) * np.asarray(u + w)) ** 2, -1)  # |q + k|² per pair
    # Each feature term Y = exp(f·s - |s|²/2) is lognormal (σ² = |s|²) with kurtosis κ_Y; the mean of
    # m terms has kurtosis 3 + (κ_Y - 3)/m, and the sample variance over n draws has standard error
    # Var·sqrt((κ - 1)/n + 2/(n - 1)) (exact moments, not estimated from the heavy-tailed sample).
    kappa_y = np.exp(4 * s2) + 2 * np.exp(3 * s2) + 3 * np.exp(2 * s2) - 3
    measured = []
    for m in (8, 32, 128):
        bias, var, theory = variance.kernel_statistics(u, w, amplification, m, "iid", draws, jax.random.key(m))
        assert np.all(np.abs(bias) < 5 * np.sqrt(theory / draws)), (m, bias)  # unbiased
        kappa = 3 + (kappa_y - 3) / m
        standard_error = theory * np.sqrt((kappa - 1) / draws + 2 / (draws - 1))
        assert np.all(np.abs(var - theory) < 5 * standard_error), (m, var / theory)
        measured.append(var.mean())
    slope = np.polyfit(np.log([8, 32, 128]), np.log(measured), 1)[0]
    assert abs(slope + 1) < 0.1, slope


def test_quick_grid_outputs(tmp_path):
    # One m: every m compiles the estimators again, most of this test's time (the dependence on m is
    # test_variance_matches_closed_form_and_slope's).
    grid = variance.Grid(ms=(32,), ks=(1, 6), kernel_draws=200, pairs=4, attention_draws=4, grad_draws=4,
                         grad_ms=(16,), grad_ks=(1,), patch=10)  # fmt: skip
    records = variance.run(grid)
    quantities = {r["quantity"] for r in records}
    assert {
        "kernel_variance",
        "kernel_bias",
        "attention_error_mean",
        "grad_bias_q",
        "grad_variance_params",
    } <= quantities
    assert all({"quantity", "m", "k", "features", "measured", "theory"} <= set(r) for r in records)
    iid = variance.select(records, quantity="kernel_variance", data="synthetic", features="iid", k=1)
    assert all(r["theory"] is not None and r["theory"] > 0 for r in iid)
    # Orthogonal features reduce the attention error at equal m (k = 1, image features).
    err = {kind: variance.select(records, quantity="attention_error_mean", k=1, m=32, features=kind)[0]["measured"]
           for kind in variance.KINDS}  # fmt: skip
    assert err["orthogonal"] < err["iid"]
    variance.plot(records, tmp_path)
    assert (tmp_path / "variance_vs_m.png").stat().st_size > 0 and (tmp_path / "error_vs_k.png").exists()
