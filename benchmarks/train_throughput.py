"""Training throughput of the students, JAX against PyTorch, side by side in one process.

    python benchmarks/train_throughput.py                  # depthwise table + training table
    python benchmarks/train_throughput.py --only depthwise # the depthwise layers only
    python benchmarks/train_throughput.py --only train --models resnet18 --steps 3
    python benchmarks/train_throughput.py --only conv      # 1x1 convolutions as dots or not

Training step (both frameworks): forward in train mode (batch-norm batch statistics, stochastic
depth), a linear classifier on the pooled feature, softmax cross-entropy, backward, SGD with
momentum; float32, random images and labels. JAX: `retro_jax.models.create_backbone`, one
`jax.jit` over a functional split of the model with the state donated; compile time is reported
apart. PyTorch: the torchvision model with its classifier replaced by the same single linear
layer, in torch's default NCHW layout and in channels_last.

Step times are medians over `--steps` steps after warm-up; the frameworks take turns step by
step so that a change in machine load hits both alike. On a shared machine only the ratios
are trustworthy. The depthwise table times every distinct depthwise layer of EfficientNet-B0
and MobileNetV3-Large (forward, and forward + input and kernel gradients) for the shifted
implementation that `DepthwiseConv` uses on CPU, for torch, and with `--grouped` for XLA's
native grouped convolution (slow: seconds per layer). The conv table times each student's JAX
training step and the teacher's forward pass (ResNet-50, eval mode) with every
`retro_jax.models.conv.Conv` computing 1x1 convolutions as dots ('auto', the default) and as
XLA's native convolution ('native', what nnx.Conv does), the two taking turns step by step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision
from flax import nnx

from retro_jax.models import create_backbone
from retro_jax.models import depthwise
from retro_jax.models.conv import Conv

STUDENTS = ("efficientnet_b0", "mobilenet_v3_large", "resnet18")
TEACHER = "resnet50"
NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class DepthwiseLayer:
  """One depthwise layer: input (size x size x channels), kernel, stride; uses per model."""
  size: int
  channels: int
  kernel: int
  stride: int
  uses: tuple[tuple[str, int], ...]

  @property
  def name(self) -> str:
    return f"{self.size}x{self.size}x{self.channels} k{self.kernel} s{self.stride}"


# The distinct depthwise layers of EfficientNet-B0 (16 layers) and MobileNetV3-Large (15) at
# 224 px, with how often each network uses them.
B0, MV3 = "efficientnet_b0", "mobilenet_v3_large"
DEPTHWISE_LAYERS = (
    DepthwiseLayer(112, 32, 3, 1, ((B0, 1),)),
    DepthwiseLayer(112, 96, 3, 2, ((B0, 1),)),
    DepthwiseLayer(56, 144, 3, 1, ((B0, 1),)),
    DepthwiseLayer(56, 144, 5, 2, ((B0, 1),)),
    DepthwiseLayer(28, 240, 5, 1, ((B0, 1),)),
    DepthwiseLayer(28, 240, 3, 2, ((B0, 1), (MV3, 1))),
    DepthwiseLayer(14, 480, 3, 1, ((B0, 2), (MV3, 1))),
    DepthwiseLayer(14, 480, 5, 1, ((B0, 1),)),
    DepthwiseLayer(14, 672, 5, 1, ((B0, 2),)),
    DepthwiseLayer(14, 672, 5, 2, ((B0, 1), (MV3, 1))),
    DepthwiseLayer(7, 1152, 5, 1, ((B0, 3),)),
    DepthwiseLayer(7, 1152, 3, 1, ((B0, 1),)),
    DepthwiseLayer(112, 16, 3, 1, ((MV3, 1),)),
    DepthwiseLayer(112, 64, 3, 2, ((MV3, 1),)),
    DepthwiseLayer(56, 72, 3, 1, ((MV3, 1),)),
    DepthwiseLayer(56, 72, 5, 2, ((MV3, 1),)),
    DepthwiseLayer(28, 120, 5, 1, ((MV3, 2),)),
    DepthwiseLayer(14, 200, 3, 1, ((MV3, 1),)),
    DepthwiseLayer(14, 184, 3, 1, ((MV3, 2),)),
    DepthwiseLayer(14, 672, 3, 1, ((MV3, 1),)),
    DepthwiseLayer(7, 960, 5, 1, ((MV3, 2),)),
)


def median_times(runners: dict[str, Callable[[], None]], steps: int,
                 warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each runner, calling them in turn (round robin)."""
  for run in runners.values():
    for _ in range(warmup):
      run()
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------
# Depthwise layers.


def depthwise_runners(layer: DepthwiseLayer, batch: int,
                      with_grouped: bool) -> dict[str, Callable[[], None]]:
  """Forward and forward+backward callables of one layer in every implementation."""
  pad = layer.kernel // 2
  key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (batch, layer.size, layer.size, layer.channels))
  w = jax.random.normal(key_w, (layer.kernel, layer.kernel, 1, layer.channels))
  out = depthwise.output_size(layer.size, layer.kernel, layer.stride, pad)
  g = jax.random.normal(key_g, (batch, out, out, layer.channels))
  runners: dict[str, Callable[[], None]] = {}
  impls = ("shifted", "grouped") if with_grouped else ("shifted",)
  for impl in impls:
    conv = functools.partial(depthwise.depthwise_conv, stride=layer.stride, padding=pad,
                             implementation=impl)
    fwd = jax.jit(conv)

    def forward_backward(x, w, g, conv=conv):
      y, vjp = jax.vjp(conv, x, w)
      # The output too, as torch's f+b computes it: unused, XLA would drop the forward.
      return y, vjp(g)

    fwd_bwd = jax.jit(forward_backward)
    runners[f"jax {impl} fwd"] = lambda f=fwd: jax.block_until_ready(f(x, w))
    runners[f"jax {impl} f+b"] = lambda f=fwd_bwd: jax.block_until_ready(f(x, w, g))

  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
  for fmt in ("nchw", "channels_last"):
    conv_t = torch.nn.Conv2d(layer.channels, layer.channels, layer.kernel, layer.stride, pad,
                             groups=layer.channels, bias=False)
    xf, gf = xt.clone(), gt.clone()
    if fmt == "channels_last":
      conv_t = conv_t.to(memory_format=torch.channels_last)
      xf = xf.contiguous(memory_format=torch.channels_last)
      gf = gf.contiguous(memory_format=torch.channels_last)
    xf.requires_grad_(True)

    def torch_fwd(conv_t=conv_t, xf=xf):
      with torch.no_grad():
        conv_t(xf)

    def torch_fwd_bwd(conv_t=conv_t, xf=xf, gf=gf):
      xf.grad = None
      conv_t.weight.grad = None
      conv_t(xf).backward(gf)

    runners[f"torch {fmt} fwd"] = torch_fwd
    runners[f"torch {fmt} f+b"] = torch_fwd_bwd
  return runners


def depthwise_table(batch: int, steps: int, with_grouped: bool) -> str:
  """Markdown table of per-layer milliseconds and per-network totals."""
  columns: list[str] = []
  rows = []
  totals: dict[str, dict[str, float]] = {B0: {}, MV3: {}}
  for layer in DEPTHWISE_LAYERS:
    times = median_times(depthwise_runners(layer, batch, with_grouped), steps)
    columns = list(times)
    rows.append((layer, times))
    for model, count in layer.uses:
      for name, seconds in times.items():
        totals[model][name] = totals[model].get(name, 0.0) + count * seconds
    print(f"  measured {layer.name}", file=sys.stderr, flush=True)
  head = "| layer (batch %d) | uses | " % batch + " | ".join(f"{c} ms" for c in columns)
  head += " | torch best f+b / jax shifted f+b |"
  lines = [head, "|" + "---|" * (len(columns) + 3)]

  def speedup(times: dict[str, float]) -> str:
    best_torch = min(times["torch nchw f+b"], times["torch channels_last f+b"])
    return f"{best_torch / times['jax shifted f+b']:.2f}"

  for layer, times in rows:
    uses = ", ".join(f"{'B0' if m == B0 else 'MV3-L'} x{n}" for m, n in layer.uses)
    cells = " | ".join(f"{1e3 * times[c]:.1f}" for c in columns)
    lines.append(f"| {layer.name} | {uses} | {cells} | {speedup(times)} |")
  for model, times in totals.items():
    cells = " | ".join(f"**{1e3 * times[c]:.0f}**" for c in columns)
    lines.append(f"| **all of {model}** | | {cells} | **{speedup(times)}** |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training steps.


class Classifier(nnx.Module):
  """A backbone and a linear classifier on its pooled feature."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = nnx.Linear(backbone.feature_width, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.head(self.backbone(images).pooled)


def set_conv_implementation(model: nnx.Module, implementation: str) -> None:
  """Sets every `Conv` in `model` to `implementation` ('auto' or 'native')."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Conv):
      module.implementation = implementation


def jax_train_step(name: str, images: np.ndarray, labels: np.ndarray, lr: float,
                   conv_implementation: str = "auto"):
  """Returns (step callable, trace s, compile s, parameter count) for the JAX model."""
  model = Classifier(create_backbone(name, rngs=nnx.Rngs(0)), NUM_CLASSES, rngs=nnx.Rngs(1))
  set_conv_implementation(model, conv_implementation)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(lr, momentum=0.9)

  def step(params, rest, opt_state, images, labels):
    module = nnx.merge(graphdef, params, rest)

    def loss_fn(module):
      logits = module(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # nnx.value_and_grad differentiates the Params and carries the batch-stat updates out.
    loss, grads = nnx.value_and_grad(loss_fn)(module)
    _, params, rest = nnx.split(module, nnx.Param, ...)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  state = [params, rest, tx.init(params)]
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, images, labels)
  traced = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - traced

  def run() -> None:
    params, rest, opt_state, loss = compiled(*state, images, labels)
    state[:] = [params, rest, opt_state]  # The old buffers were donated.
    jax.block_until_ready(loss)

  count = sum(p.size for p in jax.tree.leaves(params))
  return run, traced - start, compile_s, count


def torch_train_step(name: str, images: np.ndarray, labels: np.ndarray, lr: float,
                     feature_width: int, channels_last: bool):
  """Returns (step callable, parameter count) for the torchvision model."""
  model = getattr(torchvision.models, name)()
  head = torch.nn.Linear(feature_width, NUM_CLASSES)
  if hasattr(model, "fc"):
    model.fc = head
  else:
    model.classifier = head
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  y = torch.from_numpy(labels.astype(np.int64))
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

  def run() -> None:
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

  return run, sum(p.numel() for p in model.parameters())


def train_table(models: list[str], batch: int, size: int, steps: int) -> str:
  """Markdown table of training images per second, JAX against torch."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  lr = 0.01
  lines = ["| model | params | JAX trace + compile s | JAX img/s | torch NCHW img/s "
           "| torch channels_last img/s | JAX / torch NCHW | JAX / torch best |",
           "|---|---|---|---|---|---|---|---|"]
  for name in models:
    run_jax, trace_s, compile_s, count = jax_train_step(name, images, labels, lr)
    width = create_backbone(name, rngs=nnx.Rngs(0)).feature_width
    run_nchw, count_t = torch_train_step(name, images, labels, lr, width, False)
    run_cl, _ = torch_train_step(name, images, labels, lr, width, True)
    if count != count_t:
      raise AssertionError(f"{name}: JAX has {count} parameters, torch {count_t}")
    times = median_times({"jax": run_jax, "nchw": run_nchw, "cl": run_cl}, steps)
    ips = {k: batch / t for k, t in times.items()}
    best = max(ips["nchw"], ips["cl"])
    lines.append(
        f"| {name} | {count / 1e6:.2f} M | {trace_s:.1f} + {compile_s:.1f} | {ips['jax']:.2f} "
        f"| {ips['nchw']:.2f} | {ips['cl']:.2f} | **{ips['jax'] / ips['nchw']:.2f}** "
        f"| {ips['jax'] / best:.2f} |")
    print(f"  measured {name}", file=sys.stderr, flush=True)
  return "\n".join(lines)


def jax_forward(name: str, images: np.ndarray, conv_implementation: str):
  """Returns (forward callable, compile s): the backbone in eval mode, pooled features."""
  model = create_backbone(name, rngs=nnx.Rngs(0))
  set_conv_implementation(model, conv_implementation)
  model.eval()
  graphdef, state = nnx.split(model)
  images = jnp.asarray(images)
  start = time.perf_counter()
  compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x).pooled).lower(
      state, images).compile()
  compile_s = time.perf_counter() - start
  return lambda: jax.block_until_ready(compiled(state, images)), compile_s


def conv_table(models: list[str], teacher: str, batch: int, size: int, steps: int) -> str:
  """Markdown table: students' training steps and the teacher's forward, native vs dot 1x1."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  lines = ["| model | pass | compile s native / dot | img/s, 1x1 as XLA conv (native) "
           "| img/s, 1x1 as dot (auto) | dot / native |",
           "|---|---|---|---|---|---|"]
  work = [(name, "train step") for name in models] + ([(teacher, "forward")] if teacher else [])
  for name, kind in work:
    runners, compile_s = {}, {}
    for impl in ("native", "auto"):
      if kind == "forward":
        runners[impl], compile_s[impl] = jax_forward(name, images, impl)
      else:
        runners[impl], _, compile_s[impl], _ = jax_train_step(name, images, labels, 0.01, impl)
    times = median_times(runners, steps)
    ips = {k: batch / t for k, t in times.items()}
    lines.append(f"| {name} | {kind} | {compile_s['native']:.1f} / {compile_s['auto']:.1f} "
                 f"| {ips['native']:.2f} | {ips['auto']:.2f} "
                 f"| **{ips['auto'] / ips['native']:.2f}** |")
    print(f"  measured {name} {kind}", file=sys.stderr, flush=True)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def machine_description() -> str:
  """Date, CPU, load, library versions and the environment that changes timings."""
  cpu = platform.processor()
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
               if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  env = {k: os.environ[k] for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "OMP_NUM_THREADS")
         if k in os.environ}
  return "\n".join([
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- CPU: {cpu}, {os.cpu_count()} logical cores; load average at start "
      f"{os.getloadavg()[0]:.2f}",
      f"- jax {jax.__version__} ({jax.default_backend()}), flax {_version('flax')}, "
      f"optax {optax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
      f"torchvision {torchvision.__version__}, Python {platform.python_version()}",
      f"- environment: {env or 'no XLA_FLAGS / GLIBC_TUNABLES / OMP_NUM_THREADS'}",
  ])


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version(package)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--only", choices=("all", "depthwise", "train", "conv"), default="all")
  parser.add_argument("--models", default=",".join(STUDENTS),
                      help="comma-separated backbone names for the training and conv tables")
  parser.add_argument("--teacher", default=TEACHER,
                      help="backbone whose forward pass the conv table times ('' for none)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
  parser.add_argument("--grouped", action="store_true",
                      help="also time XLA's grouped convolution in the depthwise table (slow)")
  args = parser.parse_args(argv)

  print(f"Command: python {' '.join(sys.argv)}\n")
  print(machine_description() + "\n")
  if args.only in ("all", "depthwise"):
    print(f"### Depthwise layers, batch {args.batch_size}, float32 (median ms of {args.steps})\n")
    print(depthwise_table(args.batch_size, args.steps, args.grouped) + "\n", flush=True)
  if args.only in ("all", "train"):
    print(f"### Training, batch {args.batch_size}, {args.image_size} px, float32 "
          f"(median of {args.steps} steps)\n")
    models = [m for m in args.models.split(",") if m]
    print(train_table(models, args.batch_size, args.image_size, args.steps) + "\n")
  if args.only in ("all", "conv"):
    print(f"### 1x1 convolutions as dots, batch {args.batch_size}, {args.image_size} px, float32 "
          f"(median of {args.steps} steps)\n")
    models = [m for m in args.models.split(",") if m]
    print(conv_table(models, args.teacher, args.batch_size, args.image_size, args.steps) + "\n")
  print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
