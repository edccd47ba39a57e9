"""Where a jitted ENLCN computation spends its time: per-op wall time from a jax.profiler trace.

    python benchmarks/profile.py train_step --json benchmarks/results/profile_train_step_cpu.json
    python benchmarks/profile.py inference --side 512 --json benchmarks/results/profile_inference_512_cpu.json

Compiles the full ×4 train step (batch 16, LR patch 48, as `train_step.py`) or untiled ×4
inference of one LR ``side``² image, runs it once untraced and once under ``jax.profiler.trace``,
then attributes every microsecond of the traced run's wall time to the innermost XLA op running
then (XLA:CPU runs some dots asynchronously: their time runs until their ``end:`` event). Ops are
grouped by pass (forward / backward), by layer (trunk ResBlocks, upsampler stages, tail, attention,
contrastive term) and by kind (convolution, dot, TopK, copies and elementwise fusions by XLA's
fusion name), and the table lists the groups by time. Profiling costs a few per cent of speed; the
untraced time is printed next to the traced one.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import cpu, models  # noqa: E402

_LAYERS = ("upsampler/conv_0", "upsampler/conv_1", "upsampler", "tail", "contrastive", "attention", "resblocks",
           "body_conv", "head")  # fmt: skip


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name → (opcode, op_name metadata) from a compiled module's text."""
    info = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (?:\([^)]*\)|\S+) (\w[\w-]*)\((.*)$", hlo_text, re.M):
        name, opcode, rest = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        info[name] = (opcode, op_name.group(1) if op_name else "")
    return info


def category(name: str, info: dict[str, tuple[str, str]]) -> str:
    """'pass | layer | kind' of one HLO op."""
    opcode, op_name = info.get(name, ("?", ""))
    direction = "backward" if "transpose(jvp" in op_name else "forward"
    layer = next((layer for layer in _LAYERS if layer in op_name), "other")
    if "conv_general_dilated" in op_name or opcode == "convolution":
        kind = "convolution"
    elif "dot_general" in op_name or opcode == "dot":
        kind = "dot"
    elif opcode == "custom-call":
        kind = "custom-call (TopK)"
    else:
        kind = re.sub(r"[.\d]+$", "", name).replace("wrapped_", "")
    return f"{direction} | {layer} | {kind}"


def attribute(trace_events: list[dict]) -> tuple[float, collections.Counter]:
    """(wall seconds of the run, Counter op name → seconds while it was the innermost running op).

    Ops are the trace's events that name an ``hlo_op``; an ``end: <op>`` event ends an op that the
    executor dispatched asynchronously (its own event covers only the dispatch). An op inside a
    loop is dispatched once per iteration and the next dispatch can come before the previous
    instance's end, so each ``end:`` closes the oldest open dispatch of that op (first in, first
    out); a dispatch of such an op that no ``end:`` closes runs until the next op starts."""
    ops = [e for e in trace_events if e.get("ph") == "X" and ("hlo_op" in e.get("args", {}) or
                                                           e["name"].startswith("end: "))]  # fmt: skip
    run = max((e for e in trace_events if e.get("name") == "ThunkExecutor::Execute (wait for completion)"),
              key=lambda e: e["dur"])  # fmt: skip
    open_starts: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    intervals = []
    # At equal timestamps a dispatch sorts before an end, so an end can close it.
    for e in sorted(ops, key=lambda e: (e["ts"], e["name"].startswith("end: "))):
        if e["name"].startswith("end: "):
            if open_starts[e["name"][5:]]:
                i = open_starts[e["name"][5:]].popleft()
                start, stop, name = intervals[i]
                intervals[i] = (start, max(stop, e["ts"]), name)
            continue
        open_starts[e["name"]].append(len(intervals))
        intervals.append((e["ts"], e["ts"] + e["dur"], e["name"]))
    # The trace has no ``end:`` for the last dispatch of an asynchronous op in a loop (the loop's
    # last iteration): such a dispatch runs until the next op starts. Ops never seen with an
    # ``end:`` ran synchronously, within their own event.
    asynchronous = {e["name"][5:] for e in ops if e["name"].startswith("end: ")}
    starts = sorted(start for start, _, _ in intervals)
    for i in (i for name in asynchronous for i in open_starts[name]):
        start, stop, name = intervals[i]
        later = bisect.bisect_right(starts, stop)
        intervals[i] = (start, max(stop, starts[later] if later < len(starts) else run["ts"] + run["dur"]), name)
    points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(intervals)] +
                    [(t, -1, i) for i, (_, t, _) in enumerate(intervals)])  # fmt: skip
    active: set[int] = set()
    seconds: collections.Counter = collections.Counter()
    last = run["ts"]
    for t, kind, i in points:
        if active:  # the latest-started op that is not a loop is the one running
            inner = [k for k in active if not intervals[k][2].startswith("while")] or list(active)
            seconds[intervals[max(inner, key=lambda k: intervals[k][0])][2]] += (t - last) / 1e6
        else:
            seconds["(no op running)"] += max(0.0, t - last) / 1e6
        last = t
        (active.add if kind == 1 else active.discard)(i)
    # After the last traced op: the run's tail when the trace dropped events (see `main`).
    seconds["(after the last traced op)"] += max(0.0, run["ts"] + run["dur"] - last) / 1e6
    return run["dur"] / 1e6, seconds


def rollup(rows: list[dict], field: int, wall: float) -> list[dict]:
    """Group rows by one field of 'pass | layer | kind' (1: layer; 2: kind, matmul-like ops together)."""
    totals: collections.Counter = collections.Counter()
    for row in rows:
        parts = row["group"].split(" | ")
        key = parts[field] if len(parts) == 3 else row["group"]
        if field == 2 and key in ("convolution", "dot"):
            key = "convolution or dot"
        totals[key] += row["seconds"]
    return [{"group": key, "seconds": seconds, "share": seconds / wall} for key, seconds in totals.most_common()]


def computation(what: str, side: int, conv_general_dilated=None):
    """(jitted function, its arguments) for 'train_step' or 'inference'."""
    if what == "inference":
        model = models.ENLCN(scale=4, conv_general_dilated=conv_general_dilated)
        variables = models.init_variables(model, jax.random.key(0))
        x = jax.random.uniform(jax.random.key(side), (1, side, side, 3))
        return jax.jit(lambda v, x: model.apply(v, x)), (variables, x)
    from benchmarks import train_step
    from configs import enlca_x4
    from enlca_jax import train_step as train_step_lib

    config = enlca_x4.get_config()
    fn, model, tx = train_step.step_fn(config, True, conv_general_dilated)
    batch = train_step.synthetic_batch(16, config.data.patch_size, config.model.scale)
    return jax.jit(fn), (train_step_lib.create_train_state(config, model, tx), batch)


def main(argv=None, conv_general_dilated=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train_step", "inference"))
    parser.add_argument("--side", type=int, default=512, help="LR side for inference")
    parser.add_argument("--top", type=int, default=30, help="rows of the table")
    common.add_conv_flags(parser)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    fn, fn_args = computation(args.what, args.side, common.model_conv(args, conv_general_dilated))
    compiled = fn.lower(*fn_args).compile()
    jax.block_until_ready(compiled(*fn_args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*fn_args))
    untraced = time.perf_counter() - start
    # The trace keeps at most 1 M events by default, fewer than a ×4 train step at batch 16 makes
    # (its last quarter was missing); this raises the cap unless you set it yourself.
    os.environ.setdefault("TF_PROFILER_TRACE_VIEWER_MAX_EVENTS", str(50_000_000))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*fn_args))
        trace_file = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")[0]
        with gzip.open(trace_file) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    wall, per_op = attribute(events)
    if per_op["(after the last traced op)"] > 0.01 * wall:
        print(f"warning: the trace ends {per_op['(after the last traced op)']:.1f} s before the run does "
              "(events dropped); raise TF_PROFILER_TRACE_VIEWER_MAX_EVENTS", flush=True)  # fmt: skip
    info = op_metadata(compiled.as_text())
    groups: collections.Counter = collections.Counter()
    for name, seconds in per_op.items():
        groups[category(name, info) if name in info else name] += seconds
    rows = [{"group": group, "seconds": seconds, "share": seconds / wall} for group, seconds in groups.most_common()]
    rollups = {"layer": rollup(rows, 1, wall), "kind": rollup(rows, 2, wall)}
    print(f"{args.what}: traced run {wall:.2f} s (untraced {untraced:.2f} s)")
    common.print_table(rows[: args.top], ["group", "seconds", "share"])
    for field, table in rollups.items():
        print(f"\nby {field}:")
        common.print_table(table, ["group", "seconds", "share"])
    top_ops = [{"op": name, "seconds": s, "group": category(name, info)} for name, s in per_op.most_common(40)]
    common.write_json(args.json, {"benchmark": f"profile_{args.what}", "machine": common.machine_info(),
                                  "side": args.side if args.what == "inference" else None, "traced_seconds": wall,
                                  "untraced_seconds": untraced, "groups": rows, "by_layer": rollups["layer"],
                                  "by_kind": rollups["kind"], "top_ops": top_ops})  # fmt: skip
    return 0


if __name__ == "__main__":
    # One heap for inference (as eval.py); the train step keeps glibc's arenas, as train.py.
    sys.exit(main(conv_general_dilated=cpu.setup(restart=True, single_arena="inference" in sys.argv[1:])))
