"""benchmarks/profile.py: wall time is attributed to the innermost running op, async dots included."""

import pytest

from benchmarks import profile


def event(name, ts, dur, tid=1, op=True):
    args = {"hlo_op": name} if op else {}
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_attribute_innermost_op_async_dots_and_gaps():
    events = [
        event("ThunkExecutor::Execute (wait for completion)", 0, 100, op=False),
        event("while.3", 0, 60),  # a loop: its body ops take its time
        event("fusion.1", 5, 20),
        event("dot.7", 30, 1),  # dispatched, runs on the pool until its end event at 50
        event("end: dot.7", 50, 0, tid=2, op=False),
        event("ThreadpoolListener::Record", 31, 5, tid=2, op=False),  # executor bookkeeping: ignored
        event("copy.2", 70, 20),
        event("$python_frame", 0, 100, op=False),
        event("PjitFunction(jit(f))", 1, 2, tid=3, op=False),  # host-side: not an op
    ]
    wall, seconds = profile.attribute(events)
    assert wall == pytest.approx(100e-6)
    assert seconds["fusion.1"] == pytest.approx(20e-6)
    assert seconds["dot.7"] == pytest.approx(20e-6)
    assert seconds["while.3"] == pytest.approx(20e-6)  # 0-5, 25-30, 50-60
    assert seconds["copy.2"] == pytest.approx(20e-6)
    assert seconds["(no op running)"] == pytest.approx(10e-6)  # 60-70
    assert seconds["(after the last traced op)"] == pytest.approx(10e-6)  # 90-100
    assert sum(seconds.values()) == pytest.approx(wall)


def test_each_end_closes_the_oldest_open_dispatch_of_its_op():
    # A conv in a loop body: iteration 2 is dispatched (at 40) before iteration 1 ends (at 45);
    # iteration 3 (at 91) has no end event, as a loop's last iteration in XLA:CPU traces.
    events = [
        event("ThunkExecutor::Execute (wait for completion)", 0, 100, op=False),
        event("while.1", 0, 100),
        event("conv.0", 0, 1),
        event("conv.0", 40, 1, tid=2),
        event("end: conv.0", 45, 0, tid=3, op=False),
        event("end: conv.0", 90, 0, tid=3, op=False),
        event("conv.0", 91, 1),
        event("copy.1", 97, 3),
    ]
    wall, seconds = profile.attribute(events)
    assert seconds["conv.0"] == pytest.approx(96e-6)  # 0-90 and 91-97 (until copy.1 starts)
    assert seconds["while.1"] == pytest.approx(1e-6)
    assert seconds["copy.1"] == pytest.approx(3e-6)
    assert seconds["(no op running)"] == 0
    assert sum(seconds.values()) == pytest.approx(wall)


def test_category_reads_pass_layer_and_kind_from_hlo_metadata():
    def line(name, shape, op, op_name):
        return f'  %{name} = {shape} {op}(%a), metadata={{op_name="jit(f)/{op_name}"}}'

    hlo = "\n".join([
        line("ynn_fusion.4", "f32[4,48,48,256]{3,2,1,0}", "fusion",
             "transpose(jvp(ENLCN))/resblocks_3/conv1/while/body/conv_general_dilated"),
        line("custom-call.1", "(f32[8,65]{1,0}, s32[8,65]{1,0})", "custom-call",
             "jvp(ENLCN)/attention_0/attention_0.contrastive/top_k"),
        line("copy_bitcast_fusion.5", "f32[16,192,192,256]{3,2,1,0}", "fusion",
             "jvp(ENLCN)/ENLCN.reconstruct/upsampler/transpose"),
    ])  # fmt: skip
    info = profile.op_metadata(hlo)
    assert profile.category("ynn_fusion.4", info) == "backward | resblocks | convolution"
    assert profile.category("custom-call.1", info) == "forward | contrastive | custom-call (TopK)"
    assert profile.category("copy_bitcast_fusion.5", info) == "forward | upsampler | copy_bitcast_fusion"
