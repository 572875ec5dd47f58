r"""Where the time of the engine's training step goes on the CPU, by kind of operation.

    python benchmarks/step_profile.py                       # retro, EfficientNet-B0, batch 16
    python benchmarks/step_profile.py --method disco --steps 3
    python benchmarks/step_profile.py --variant ours_cross_view

Builds and compiles the step exactly as benchmarks/retro_step.py's `ours` variants do (the
shipped config, a random ResNet-50 MoCo-v2 teacher, 224 px, a uint8 batch), runs `--warmup`
steps, then `--steps` steps under `jax.profiler`, and reads the trace: XLA:CPU records one
event per executed HLO instruction (thunk). Each instruction of the optimised HLO module is
put in a category from its opcode and attributes (a fusion by what its fused computation
contains), and forward or backward from its `op_name` metadata (JAX names the operations of a
gradient `transpose(jvp(...))`). The table gives, per category, the time summed over the
profiled steps' instruction events (seconds per step) and its share; the header gives the
whole step's XLA FLOP count and achieved GFLOP/s.

Instruction events can overlap (XLA:CPU runs independent thunks concurrently), so the shares
are of the summed event time, which the header compares with the steps' wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import retro_step  # pylint: disable=wrong-import-position

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+"
                          r"([\w\-]+)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\))?.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """{instruction name: its HLO line}, {computation name: its instructions' lines}."""
  instructions: dict[str, str] = {}
  computations: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    if line.rstrip().endswith("{") and "=" not in line.split("{")[0]:
      match = _COMPUTATION.match(line)
      current = match.group(1) if match else None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      instructions[match.group(1)] = line
      if current is not None:
        computations[current].append(line)
  return instructions, computations


def _opcode(line: str) -> str:
  match = _INSTRUCTION.match(line)
  return match.group(2) if match else "?"


def _convolution_kind(line: str) -> str:
  groups = re.search(r"feature_group_count=(\d+)", line)
  batch_groups = re.search(r"batch_group_count=(\d+)", line)
  if groups and int(groups.group(1)) > 1:
    return "depthwise convolution"
  if batch_groups and int(batch_groups.group(1)) > 1:
    return "depthwise convolution (kernel gradient)"
  window = re.search(r"window=\{size=([\dx]+)", line)
  if window and set(window.group(1).split("x")) == {"1"}:
    return "1x1 convolution"
  return "dense convolution"


def category(line: str, computations: dict[str, list[str]]) -> str:
  """The kind of work of one HLO instruction."""
  opcode = _opcode(line)
  if opcode == "convolution":
    return _convolution_kind(line)
  if opcode == "dot":
    return "matrix product"
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return f"custom call {target.group(1) if target else ''}".strip()
  if opcode == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = computations.get(called.group(1), []) if called else []
    opcodes = {_opcode(inner) for inner in body}
    for inner in body:
      if _opcode(inner) == "convolution":
        return _convolution_kind(inner) + " (fused)"
    if "dot" in opcodes:
      return "matrix product (fused)"
    if opcodes & {"reduce", "reduce-window"}:
      return "fusion with a reduction (BN statistics, pooling, losses)"
    if opcodes <= {"parameter", "transpose", "copy", "bitcast", "reshape", "broadcast",
                   "constant"}:
      return "layout: transpose / copy"
    return "element-wise fusion"
  if opcode in ("copy", "transpose", "bitcast", "reshape"):
    return "layout: transpose / copy"
  if opcode in ("reduce", "reduce-window", "select-and-scatter"):
    return "reduction / pooling"
  return opcode


def direction(line: str) -> str:
  op_name = re.search(r'op_name="([^"]*)"', line)
  return "backward" if op_name and "transpose(" in op_name.group(1) else "forward"


def instruction_times(trace_dir: str, instructions: dict[str, str]) -> dict[str, float]:
  """Seconds per instruction name, summed over the trace's events of that name."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  times: dict[str, float] = collections.Counter()
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as file:
      space.ParseFromString(file.read())
    for plane in space.planes:
      names = {key: meta.name for key, meta in plane.event_metadata.items()}
      for line in plane.lines:
        for event in line.events:
          name = names.get(event.metadata_id)
          if name in instructions:
            times[name] += event.duration_ps * 1e-12
  return times


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="retro", choices=retro_step.METHODS)
  parser.add_argument("--student", default="efficientnet_b0", choices=retro_step.STUDENTS)
  parser.add_argument("--variant", default="ours",
                      choices=[v for v in retro_step.VARIANTS if v.startswith("ours")])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top

  spec = dict(method=args.method, student=args.student, batch=args.batch,
              resolution=args.resolution, variant=args.variant)
  compiled, state, teacher_state, batch, compile_s, cost = retro_step.compiled_step(spec)
  instructions, computations = parse_hlo(compiled.as_text())

  def run():
    nonlocal state
    state, metrics = compiled(state, teacher_state, batch)
    jax.block_until_ready(metrics)

  for _ in range(args.warmup):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    started = time.perf_counter()
    for _ in range(args.steps):
      run()
    wall = (time.perf_counter() - started) / args.steps
    jax.profiler.stop_trace()
    times = instruction_times(trace_dir, instructions)

  by_category: dict[tuple[str, str], float] = collections.Counter()
  for name, seconds in times.items():
    line = instructions[name]
    by_category[(category(line, computations), direction(line))] += seconds / args.steps
  total = sum(by_category.values())
  print(f"# {args.method}, {args.student}, batch {args.batch}, {args.resolution} px, "
        f"{args.variant}: {wall:.3f} s per step (wall, median not taken: {args.steps} steps "
        f"under the profiler), instruction events {total:.3f} s per step; compile "
        f"{compile_s:.0f} s; XLA FLOP per step {float(cost['flops']) / 1e9:.1f} G, "
        f"{float(cost['flops']) / 1e9 / wall:.0f} GFLOP/s at the wall time")
  print()
  print("| category | direction | s per step | share |")
  print("|---|---|---:|---:|")
  for (kind, way), seconds in sorted(by_category.items(), key=lambda item: -item[1]):
    if seconds / total >= 0.002:
      print(f"| {kind} | {way} | {seconds:.3f} | {100 * seconds / total:.1f} % |")
  # XLA's fusion names say what was fused (e.g. multiply_add_fusion: the depthwise layers'
  # shifted multiply-adds; ynn_fusion: convolutions and products handed to XNNPACK).
  by_kind: dict[str, float] = collections.Counter()
  for name, seconds in times.items():
    by_kind[re.sub(r"\.\d+$", "", name)] += seconds / args.steps
  print()
  print("By instruction kind (s per step): " + ", ".join(
      f"{kind} {seconds:.3f}" for kind, seconds in sorted(by_kind.items(),
                                                          key=lambda item: -item[1])[:10]))
  print()
  print("Slowest instructions (s per step):")
  for name, seconds in sorted(times.items(), key=lambda item: -item[1])[:12]:
    line = instructions[name]
    shape = line.split("=", 1)[1].split()[0]
    op_name = re.search(r'op_name="([^"]*)"', line)
    print(f"  {seconds / args.steps:.4f}  {name}  {category(line, computations)}, "
          f"{direction(line)}, {shape}  [{op_name.group(1)[-90:] if op_name else ''}]")


if __name__ == "__main__":
  main()
