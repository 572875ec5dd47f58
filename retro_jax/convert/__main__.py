"""`python -m retro_jax.convert`: see `retro_jax.convert.cli`."""

import sys

from retro_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
