"""Thin wrapper: ``python benchmarks/attention_kernel.py [--quick]`` = ``der bench attention-kernel``."""

import sys

from der_lab.bench.attention_kernel import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
