"""Thin wrapper: ``python benchmarks/surrogate_op.py [args]`` == ``der bench surrogate-op [args]``."""

import sys

from der_lab.bench.surrogate_op import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
