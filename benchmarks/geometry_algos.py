"""Thin wrapper: ``python benchmarks/geometry_algos.py [--quick]`` = ``der bench hull``."""

import sys

from der.bench.hull import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
