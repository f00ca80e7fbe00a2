"""`python -m weights_conversion SRC OUT`: the same as `vicrop-jax convert`."""

import sys

from vicrop_jax.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
