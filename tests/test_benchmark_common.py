"""benchmarks.common: FLOP counting (the loop-free twin, XLA:CPU's count), timing in groups, the matmul reference."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from enlca_jax.cpu import conv

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(conv, "MAX_CHUNK_IMAGES", 1)
    monkeypatch.setattr(conv, "MAX_CHUNK_PIXELS", 64)


def conv_with(fn):
    return lambda x, w: fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


def test_flops_are_counted_on_the_loop_free_twin(small_chunks):
    x = jnp.ones((4, 8, 8, 16))
    w = jnp.ones((3, 3, 16, 16))
    chunked, loop_free = conv_with(conv.conv_general_dilated), conv_with(jax.lax.conv_general_dilated)
    # XLA counts the body of the 4-image loop once (plus its counter): a quarter of the work.
    assert common.counted_flops(chunked, x, w) == pytest.approx(common.counted_flops(loop_free, x, w) / 4, rel=1e-3)
    compiled, flops, memory = common.compiled_cost(chunked, x, w, flops_fn=loop_free)
    assert flops == common.counted_flops(loop_free, x, w) > 2 * 4 * 6 * 6 * 9 * 16 * 16  # at least the interior
    assert compiled(x, w).shape == (4, 8, 8, 16)
    assert memory["output_size_in_bytes"] == 4 * 8 * 8 * 16 * 4


def test_reference_matmul_is_the_higher_figure():
    once = common.matmul_gflops(size=64, repeats=2, min_seconds=0.01)
    assert once > 0
    assert common.reference_matmul(1e12) == 1e12


def test_matmul_ratios_only_on_selected_rows_with_a_rate():
    rows = [{"case": "a", "gflops_per_s": 5e11}, {"case": "b"}, {"case": "skip", "gflops_per_s": 1.0}]
    reference = common.add_matmul_ratios(rows, 1e12, where=lambda row: row["case"] != "skip")
    assert reference == 1e12
    assert rows[0]["of_matmul"] == 0.5
    assert "of_matmul" not in rows[1] and "of_matmul" not in rows[2]


def test_the_matmul_reference_is_described_with_its_size_and_both_figures():
    line = common.describe_matmul(212.04, 206.1)
    assert line == "float32 matmul 2048²: 212.0 GFLOP/s (before: 206.1; the higher is used)"


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that only `call` advances, 2 ms per call; returns (call, list of calls)."""
    now, calls = [0.0], []
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])

    def call():
        calls.append(now[0])
        now[0] += 0.002
        return jnp.zeros(())

    return call, calls


def test_short_calls_are_timed_in_back_to_back_groups(fake_clock):
    call, calls = fake_clock
    # Probe: one 2 ms call < 10 ms, so each sample is a group of 5 calls, timed per call.
    assert common.time_fn(call, repeats=3, warmup=1, group_seconds=0.01) == pytest.approx(0.002)
    assert len(calls) == 1 + 1 + 3 * 5  # warm-up, probe, three groups
    calls.clear()
    # At least min_seconds of calls: 0.105 s / (5 × 2 ms) → 10 groups.
    common.time_fn(call, repeats=3, warmup=0, min_seconds=0.105, group_seconds=0.01)
    assert len(calls) == 1 + 10 * 5


def test_calls_are_blocked_on_alone_on_the_cpu(fake_clock):
    call, calls = fake_clock
    assert jax.default_backend() == "cpu"
    assert common.time_fn(call, repeats=3, warmup=1) == pytest.approx(0.002)
    assert len(calls) == 1 + 3  # no probe, no groups
    calls.clear()
    common.time_fn(call, repeats=3, warmup=0, min_seconds=0.021, group_seconds=0.0)
    assert len(calls) == 10


def test_cpu_machine_info_has_the_cpu_matmul_and_no_device_memory():
    info = common.machine_info()
    assert info["matmul_size"] == common.matmul_size() == 2048
    assert info["device_memory_gib"] is None
    assert common.device_memory() == {}


def test_rows_without_a_flop_count_get_no_rate():
    assert common.rate(None, 2.0) == {} and common.rate(0.0, 2.0) == {}
    assert common.rate(4e9, 2.0) == {"gflop": 4.0, "gflops_per_s": 2.0}
    rows = [{"case": "counted", **common.rate(4e9, 2.0)}, {"case": "not counted", **common.rate(None, 2.0)}]
    common.add_matmul_ratios(rows, 1e12)
    assert rows[0]["of_matmul"] == 2.0 / 1e12 and "of_matmul" not in rows[1]


def test_cpu_compiled_count_is_the_executable_count():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    fn = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ x.T) ** 2))
    compiled, flops, _ = common.compiled_cost(fn, x)
    assert flops == common.cpu_compiled_flops(fn, x) >= 2 * 2 * 64 * 64 * 32  # two matmuls at least
    assert flops == common._flops(compiled.cost_analysis())


def test_without_a_cpu_backend_an_accelerator_row_has_no_count(monkeypatch, capsys):
    def no_cpu(*args):
        raise RuntimeError("Unknown backend cpu")

    monkeypatch.setattr(common, "on_accelerator", lambda: True)
    monkeypatch.setattr(common, "cpu_compiled_flops", no_cpu)
    x = jnp.ones((8, 8))
    compiled, flops, _ = common.compiled_cost(lambda x: x @ x, x)
    assert flops is None and common.rate(flops, 1.0) == {}
    assert "add cpu to JAX_PLATFORMS" in capsys.readouterr().err
    assert compiled(x).shape == (8, 8)
