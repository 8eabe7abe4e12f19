"""Thin wrapper: ``python benchmarks/geometry_entropynet.py [--quick]`` = ``der bench geometry``."""

import sys

from der.bench.geometry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
