"""Thin wrapper: ``python benchmarks/surrogate_floor.py [args]`` == ``der bench surrogate-floor [args]``."""

import sys

from der_lab.bench.surrogate_floor import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
