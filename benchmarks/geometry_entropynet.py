"""Thin wrapper: ``python benchmarks/geometry_entropynet.py [--quick]`` = ``der bench geometry-entropynet``."""

import sys

from der_lab.bench.geometry_entropynet import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
