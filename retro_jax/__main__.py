"""`python -m retro_jax SUBCOMMAND ...`: see `retro_jax.cli`."""

import sys

from retro_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
