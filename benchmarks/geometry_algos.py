"""Thin wrapper: ``python benchmarks/geometry_algos.py [--quick]`` = ``der bench geometry-algos``."""

import sys

from der_lab.bench.geometry_algos import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
