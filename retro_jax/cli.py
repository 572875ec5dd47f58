"""The `python -m retro_jax` (or `retro-jax`) front door: one subcommand per CLI module.

Each subcommand is a module `retro_jax.<name>` with `main(argv) -> int`, so
`python -m retro_jax NAME ARGS` and `python -m retro_jax.NAME ARGS` are the same program.
Modules are imported only when their subcommand runs: `--help` stays instant and never
imports JAX or TensorFlow.
"""

from __future__ import annotations

import importlib
import sys

import retro_jax

# name -> one-line summary; the module is retro_jax.<name>. Add a line when a CLI lands.
SUBCOMMANDS: dict[str, str] = {
    "convert": "PyTorch checkpoint (torchvision, timm, MoCo, DINO) -> retro_jax model directory",
    "data": "prepare TFDS datasets offline (fashion_mnist from Debian's dataset-fashion-mnist); list them",
    "embed": "run a model directory on an .npy array of images: features or embeddings",
    "evaluate": "k-NN and linear-probe accuracy of a model directory (also semi-supervised)",
    "export": "a trained student (workdir) -> model directory (Orbax) or PyTorch state dict",
    "info": "print versions, devices and settings (paste it into bug reports)",
    "report": "write a run's report.md and plots (losses, schedules, k-NN) from its metrics.jsonl",
}


def usage() -> str:
  width = max(len(name) for name in SUBCOMMANDS)
  commands = [f"  {name.ljust(width)}  {summary}" for name, summary in SUBCOMMANDS.items()]
  return "\n".join([
      "usage: python -m retro_jax COMMAND [ARGS ...]",
      "       python -m retro_jax.COMMAND [ARGS ...]   (the same program)",
      "",
      "Self-supervised distillation of lightweight vision models (Retro, RoB, DisCo,",
      "MoCo-v2, DINO) in JAX/Flax.",
      "",
      "commands:",
      *commands,
      "",
      "`python -m retro_jax COMMAND --help` describes one command.",
      "options: -h/--help  this message;  --version  print the version",
  ])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    # No command at all is a usage error: the help goes to stderr and the exit code is 2.
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  if argv[0] == "--version":
    print(f"retro_jax {retro_jax.__version__}")
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"retro_jax: unknown command {name!r}; choose from: {', '.join(SUBCOMMANDS)}\n"
          "Run `python -m retro_jax --help` for the list.", file=sys.stderr)
    return 2
  module = importlib.import_module(f"retro_jax.{name}")
  return module.main(rest, prog=f"python -m retro_jax {name}")


if __name__ == "__main__":
  sys.exit(main())
