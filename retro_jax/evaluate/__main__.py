"""`python -m retro_jax.evaluate`: see `retro_jax.evaluate.cli`."""

import sys

from retro_jax.evaluate.cli import main

if __name__ == "__main__":
  sys.exit(main())
