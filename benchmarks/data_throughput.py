"""Input-pipeline throughput per host core: ours (tf.data + device photometric) against MoCo-v2's.

    python benchmarks/data_throughput.py                     # 256 synthetic JPEGs, defaults
    python benchmarks/data_throughput.py --images DIR        # a real ImageFolder-style folder
    python benchmarks/data_throughput.py --seconds 5 --rounds 2 --no-extras   # quick look

What is measured, in source images per second (each image gives two 224 px views):
  * ours: `sources.open_source("folder:DIR")`, `Augmentation.from_preset("mocov2").host_views`
    as the host function of `pipeline.make_pipeline` (global batch 32, sharded with
    `batch_sharding(make_mesh())`), and the photometric half, `device_views(key, views, index)`
    under `jax.jit` on the CPU: the images end as normalised float32 views, ready for a model.
  * reference: `reference_moco_pipeline.moco_loader` (torchvision `ImageFolder` + MoCo-v2's
    `aug_plus` `TwoCropsTransform`, batch 32) with one `DataLoader` worker.

Each measurement runs in its own subprocess pinned to one core (`os.sched_setaffinity` before
TensorFlow, JAX or torch is imported; XLA, TF and torch told to use one thread; the DataLoader
worker inherits the pinning), so its images/s are images/s per core, the device-side work
included. The pipelines alternate (ours, reference, ours, ...) and the table gives the median
over rounds. Start-up (imports, building the pipeline, compiling the photometric step, the
first batch and `--warmup` more) is excluded from the rate and reported apart. The last column,
"other load", is the CPU time other processes took during the timed part (all cores' busy
time less the measured process tree's), in cores: on a shared machine it tells a clean run
from a disturbed one (load on another core slows a pinned run a little, through shared caches,
memory and the hypervisor, e.g. 5-15% on the 2-core VM of docs/benchmarks.md; it takes cores
away from the run on all cores).

The synthetic images are ImageNet-like JPEGs (~500x375, sizes varied around it, smooth fields +
shapes + texture noise, quality 90, PIL's default 4:2:0). Every pipeline reads the same folder,
in which each image appears `--repeat` times (symlinks), so that one epoch outlasts a
measurement: MoCo's loader restarts its worker at every epoch, which a 256-image folder would
otherwise turn into a large part of its time (an ImageNet epoch is 1.28M images).

Extra rows (not pinned, or breakdowns; `--no-extras` leaves them out): ours on all the cores
this process may use (no pinning, default threading), and, pinned to one core, ours without
the device photometric step and the device step alone (on random uint8 batches).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULT = "RESULT_JSON "
SIZE = 224
NUM_VIEWS = 2
SINGLE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",  # one thread; the child is pinned too
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
LABELS = {
    "ours": "ours: tf.data host crops + jitted device photometric",
    "reference": "reference: torchvision ImageFolder + aug_plus, DataLoader(num_workers=1)",
    "ours-all": "ours, all cores (no pinning; for information)",
    "ours-host": "ours, host part only (no device photometric)",
    "device": "ours, device photometric only (jit on CPU)",
}


# --- Synthetic images --------------------------------------------------------------------------

def synthetic_jpeg(rng, path: pathlib.Path) -> None:
  """One ImageNet-like JPEG: smooth colour field, soft shapes, texture and sensor noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFilter  # pylint: disable=g-import-not-at-top

  long_side = int(rng.integers(440, 541))
  short_side = int(round(long_side * rng.uniform(0.66, 0.80)))
  w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
  field = rng.uniform(0, 255, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3))
  image = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(3, 12))):
    x0, y0 = rng.integers(-w // 4, w), rng.integers(-h // 4, h)
    x1, y1 = x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    shape = rng.integers(3)
    if shape == 0:
      draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == 1:
      draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:
      points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
      draw.polygon(points, fill=colour)
  image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
  pixels = np.asarray(image, np.float32)
  # Texture (foliage, fur, fabric) at 1-4 px scales, stronger in some regions than in others,
  # and sensor noise: what makes a photo's JPEG ~100 KB rather than a drawing's ~30 KB.
  strength = rng.uniform(0.3, 1, (int(rng.integers(2, 5)), int(rng.integers(2, 5))))
  strength = np.asarray(Image.fromarray(strength.astype(np.float32), mode="F").resize(
      (w, h), Image.BICUBIC))
  for scale in (1, 2, 4):
    noise = rng.normal(0, 1, (h // scale + 1, w // scale + 1)).astype(np.float32)
    noise = np.asarray(Image.fromarray(noise, mode="F").resize((w, h), Image.BICUBIC))
    pixels += (rng.uniform(16, 40) * strength * noise)[..., None]
  pixels += rng.normal(0, 6, pixels.shape)
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_images(root: pathlib.Path, count: int, classes: int, seed: int) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = root / f"class_{i % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_jpeg(rng, folder / f"img_{i:05d}.JPEG")


def image_files(root: pathlib.Path) -> list[pathlib.Path]:
  extensions = (".jpg", ".jpeg", ".png")
  return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def repeated_folder(source: pathlib.Path, target: pathlib.Path, repeat: int) -> int:
  """`target` with the class folders of `source`, each image linked `repeat` times."""
  count = 0
  for path in image_files(source):
    folder = target / path.parent.relative_to(source)
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
      (folder / f"r{r:03d}_{path.name}").symlink_to(path.resolve())
      count += 1
  return count


# --- Children: one measurement each --------------------------------------------------------------

def _pin(core: int | None) -> None:
  if core is not None:
    os.sched_setaffinity(0, {core})


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
  """CPU-seconds all cores have spent busy since boot (/proc/stat)."""
  fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / _TICK


def _own_cpu_seconds() -> float:
  """CPU-seconds of this process and its live children (the DataLoader worker)."""
  total = sum(os.times()[:2])
  me = str(os.getpid())
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      stat = pathlib.Path(entry.path, "stat").read_text()
    except OSError:
      continue
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[1] == me:  # ppid
      total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
  return total


def _timed_loop(next_batch, args) -> dict:
  """Warm-up, then batches until `args.seconds` and `args.min_batches` are both reached.

  Also measures the other processes' CPU use meanwhile (all cores' busy time less this
  process tree's), in cores: a busy machine shows there.
  """
  for _ in range(args.warmup):
    next_batch()
  count, start = 0, time.perf_counter()
  busy, own = _machine_busy_seconds(), _own_cpu_seconds()
  while True:
    next_batch()
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= args.seconds and count >= args.min_batches:
      break
  own_used = _own_cpu_seconds() - own
  other = max(0.0, _machine_busy_seconds() - busy - own_used)
  return {"batches": count, "seconds": elapsed,
          "images_per_s": count * args.batch_size / elapsed,
          "own_cores": own_used / elapsed, "other_cores": other / elapsed}


def run_ours(args, started: float) -> dict:
  pinned = args.core is not None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if pinned:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax.data import pipeline, presets, sources  # pylint: disable=g-import-not-at-top
  from retro_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  imported = time.perf_counter()

  augmentation = presets.Augmentation.from_preset("mocov2")
  sharding = pipeline.batch_sharding(mesh_lib.make_mesh())
  base_key = jax.random.key(args.seed)

  @jax.jit
  def photometric(step, views, index):
    return augmentation.device_views(jax.random.fold_in(base_key, step), views, index)

  B = args.batch_size
  # Compiled before the pipeline starts, so that tf.data does not fill its buffers meanwhile.
  dummy_views = tuple(jax.device_put(np.zeros((B, SIZE, SIZE, 3), np.uint8), sharding)
                      for _ in range(NUM_VIEWS))
  dummy_index = jax.device_put(np.arange(B, dtype=np.int32), sharding)
  jax.block_until_ready(photometric(0, dummy_views, dummy_index))
  compiled = time.perf_counter()
  result = {"import_s": imported - started, "compile_s": compiled - imported}

  if args.pipeline == "device":  # The photometric step alone, on random uint8 views.
    rng = np.random.default_rng(0)
    views = tuple(jax.device_put(rng.integers(0, 256, (B, SIZE, SIZE, 3), np.uint8), sharding)
                  for _ in range(NUM_VIEWS))
    step = iter(range(1, 1 << 30))
    next_batch = lambda: jax.block_until_ready(photometric(next(step), views, dummy_index))
    next_batch()
    result["startup_s"] = time.perf_counter() - started
    return {**result, **_timed_loop(next_batch, args)}

  source = sources.open_source(f"folder:{args.root}")
  host_fn = functools.partial(augmentation.host_views, fused_max_views=args.fused_max_views)
  batches = pipeline.make_pipeline(source, host_fn, global_batch_size=B, seed=args.seed,
                                   sharding=sharding)
  with_device = args.pipeline != "ours-host"
  state = {"step": 0, "pending": None}

  def next_batch():
    # As in training: the step is dispatched, and the previous one awaited, while the next
    # batch is fetched; one step in flight.
    batch = next(batches)
    out = (photometric(state["step"], batch["views"], batch["index"]) if with_device
           else batch["views"])
    if state["pending"] is not None:
      jax.block_until_ready(state["pending"])
    state["step"] += 1
    state["pending"] = out

  next_batch()
  jax.block_until_ready(state["pending"])
  result["startup_s"] = time.perf_counter() - started
  result.update(_timed_loop(next_batch, args))
  jax.block_until_ready(state["pending"])
  result["threads"] = len(os.listdir("/proc/self/task"))
  result["num_examples"] = source.num_examples
  return result


def run_reference(args, started: float) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  if args.core is not None:
    torch.set_num_threads(1)
  sys.path.insert(0, str(REPO / "benchmarks"))
  import reference_moco_pipeline  # pylint: disable=g-import-not-at-top
  imported = time.perf_counter()

  loader = reference_moco_pipeline.moco_loader(args.root, args.batch_size, workers=1,
                                               size=SIZE, seed=args.seed)
  state = {"iterator": iter(loader), "epochs": 0}

  def next_batch():
    try:
      views, _ = next(state["iterator"])
    except StopIteration:  # A new epoch: MoCo's loader starts a new worker.
      state["epochs"] += 1
      state["iterator"] = iter(loader)
      views, _ = next(state["iterator"])
    assert len(views) == NUM_VIEWS and views[0].shape == (args.batch_size, 3, SIZE, SIZE)

  next_batch()
  result = {"import_s": imported - started,
            "startup_s": time.perf_counter() - started}
  result.update(_timed_loop(next_batch, args))
  result["epoch_restarts"] = state["epochs"]
  result["num_examples"] = len(loader.dataset)
  result["torch_threads"] = torch.get_num_threads()
  return result


def child(args) -> None:
  started = time.perf_counter()
  if args.pipeline == "reference":
    result = run_reference(args, started)
  else:
    result = run_ours(args, started)
  result["affinity"] = sorted(os.sched_getaffinity(0))
  print(RESULT + json.dumps(result), flush=True)


# --- Parent: rounds, table ---------------------------------------------------------------------

def measure(args, pipeline: str, core: int | None, root: pathlib.Path) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", pipeline,
             "--root", str(root), "--batch-size", str(args.batch_size),
             "--seconds", str(args.seconds), "--min-batches", str(args.min_batches),
             "--warmup", str(args.warmup), "--seed", str(args.seed),
             "--fused-max-views", str(args.fused_max_views)]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  if core is not None:
    command += ["--core", str(core)]
    env.update(SINGLE_THREAD_ENV)
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT)]
  if done.returncode or not lines:
    sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
    raise RuntimeError(f"{pipeline} failed (exit {done.returncode})")
  result = json.loads(lines[-1][len(RESULT):])
  print(f"  {pipeline:10s} core={core}: {result['images_per_s']:7.1f} img/s "
        f"({result['batches']} batches in {result['seconds']:.1f} s), start-up "
        f"{result['startup_s']:.1f} s; CPU use {result['own_cores']:.2f} cores, other "
        f"processes {result['other_cores']:.2f}", file=sys.stderr, flush=True)
  return result


def cpu_model() -> str:
  """The first CPU's model name, with its family/model numbers and whether it is a VM's."""
  info = {}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      info.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or "unknown"
  flags = info.get("flags", "").split()
  extras = [f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"]
  extras += ["AVX-512"] if "avx512f" in flags else ["AVX2"] if "avx2" in flags else []
  extras += ["virtual machine"] if "hypervisor" in flags else []
  return f"{info.get('model name', 'unknown')} ({', '.join(extras)})"


def versions() -> str:
  names = ("jax", "jaxlib", ("tensorflow", "tensorflow-cpu"), "torch", "torchvision",
           ("pillow", "Pillow-SIMD"), "numpy")
  parts = []
  for name in names:
    for candidate in (name if isinstance(name, tuple) else (name,)):
      try:
        parts.append(f"{candidate} {importlib.metadata.version(candidate)}")
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  return ", ".join(parts + [f"Python {platform.python_version()}"])


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[tuple[str, int, list[dict]]], reference_rate: float) -> str:
  lines = ["| pipeline | cores | img/s per core (median) | img/s per core, each run | "
           "ms per image per core | start-up s (median) | / reference | other load "
           "(cores, max) |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
  for name, cores, results in rows:
    rates = [r["images_per_s"] / cores for r in results]
    rate = statistics.median(rates)
    startup = statistics.median(r["startup_s"] for r in results)
    other = max(r["other_cores"] for r in results)
    lines.append(f"| {LABELS[name]} | {cores} | {rate:.1f} | "
                 f"{', '.join(f'{x:.1f}' for x in rates)} | {1000 / rate:.2f} | {startup:.1f} | "
                 f"{rate / reference_rate:.2f}x | {other:.2f} |")
  return "\n".join(lines)


def parent(args) -> None:
  command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(
      os.getcwd()) else sys.executable, os.path.relpath(__file__)] + sys.argv[1:])
  cores = sorted(os.sched_getaffinity(0))
  core = cores[-1] if args.core is None else args.core
  with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
    tmp = pathlib.Path(tmp)
    if args.images is None:
      images = tmp / "images"
      began = time.perf_counter()
      write_images(images, args.num_images, args.classes, args.seed)
      print(f"wrote {args.num_images} JPEGs in {time.perf_counter() - began:.1f} s",
            file=sys.stderr, flush=True)
    else:
      images = pathlib.Path(args.images)
    files = image_files(images)
    if not files:
      raise SystemExit(f"no images under {images}")
    sizes = [f.stat().st_size for f in files]
    from PIL import Image  # pylint: disable=g-import-not-at-top
    dims = [Image.open(f).size for f in files[:200]]
    repeat = args.repeat or max(1, math.ceil(args.min_epoch / len(files)))
    if repeat > 1:
      root = tmp / "repeated"
      repeated_folder(images, root, repeat)
    else:
      root = images

    load_before = load_average()
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for r in range(args.rounds):
      print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
      for name in ("ours", "reference"):
        runs[name].append(measure(args, name, core, root))
    rows = [("ours", 1, runs["ours"]), ("reference", 1, runs["reference"])]
    if args.extras:
      print("extra rows", file=sys.stderr, flush=True)
      rows.append(("ours-all", len(cores), [measure(args, "ours-all", None, root)]))
      rows.append(("ours-host", 1, [measure(args, "ours-host", core, root)]))
      rows.append(("device", 1, [measure(args, "device", core, root)]))
    load_after = load_average()

  reference_rate = statistics.median(r["images_per_s"] for r in runs["reference"])
  ours_rate = statistics.median(r["images_per_s"] for r in runs["ours"])
  width = [d[0] for d in dims]
  height = [d[1] for d in dims]
  ours0 = runs["ours"][0]
  print(f"Command: `{command}`\n")
  print(f"Machine: {cpu_model()}, {os.cpu_count()} cores ({len(cores)} usable), "
        f"{platform.system()} {platform.release()}; load average (1/5/15 min) "
        f"{load_before} before, {load_after} after; pinned runs on core {core}.  ")
  print(f"Libraries: {versions()}.  ")
  print(f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.  ")
  print(f"Images: {len(files)} {'synthetic ' if args.images is None else ''}JPEGs"
        f"{'' if args.images is None else ' from ' + str(images)}, "
        f"{min(width)}-{max(width)} x {min(height)}-{max(height)} px, "
        f"{statistics.mean(sizes) / 1024:.0f} KiB on average; each listed {repeat} times "
        f"({ours0['num_examples']} entries). Batch {args.batch_size}, 2 views of {SIZE} px; "
        f"each run >= {args.seconds:g} s after {args.warmup + 1} warm-up batches; "
        f"fused_max_views={args.fused_max_views}.\n")
  print(table(rows, reference_rate))
  print(f"\nOurs / reference per core: {ours_rate / reference_rate:.2f}x "
        f"(target >= 3x). Ours' start-up: imports {ours0['import_s']:.1f} s, compiling the "
        f"photometric step {ours0['compile_s']:.1f} s.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", help="an ImageFolder-style folder (default: synthetic JPEGs)")
  parser.add_argument("--num-images", type=int, default=256)
  parser.add_argument("--classes", type=int, default=4)
  parser.add_argument("--repeat", type=int, default=None,
                      help="times each image is listed (default: enough for --min-epoch)")
  parser.add_argument("--min-epoch", type=int, default=8192,
                      help="entries per epoch that --repeat defaults to reach")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=20.0,
                      help="minimum timed seconds per measurement")
  parser.add_argument("--min-batches", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2,
                      help="batches after the first one left out of the timing")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating rounds of ours and the reference (median reported)")
  parser.add_argument("--core", type=int, default=None,
                      help="the core of the pinned runs (default: the last usable one)")
  parser.add_argument("--fused-max-views", type=int, default=1,
                      help="host_views' fused_max_views (1, the default: decode once)")
  parser.add_argument("--no-extras", dest="extras", action="store_false",
                      help="leave out the all-cores and breakdown rows")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--child", choices=sorted(LABELS), help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _pin(args.core)  # Before TensorFlow, JAX or torch is imported.
    args.pipeline = args.child
    child(args)
  else:
    parent(args)


if __name__ == "__main__":
  main()
