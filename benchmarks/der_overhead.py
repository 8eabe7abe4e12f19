"""Thin wrapper: ``python benchmarks/der_overhead.py [--quick]`` = ``der bench der-overhead``."""

import sys

from der_lab.bench.der_overhead import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
