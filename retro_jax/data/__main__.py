"""`python -m retro_jax.data`: see `retro_jax.data.cli`."""

import sys

from retro_jax.data.cli import main

if __name__ == "__main__":
  sys.exit(main())
