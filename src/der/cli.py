"""The ``der`` command.

Subcommands are resolved lazily so that ``der --help`` stays fast and an optional extra that is not
installed only breaks the subcommand that needs it.

``demo``, ``exp``, ``bench`` and ``breakeven`` run code of the companion package ``der_lab`` (experiments,
benchmarks; same repository, installed beside ``der`` by ``scripts/setup.sh``). The library never imports
it: these targets are module names resolved only when the command runs.

Conventions (so that each part of the package adds commands without editing this file):

* ``der exp <name> [args]``   runs ``der_lab.experiments.<name with - replaced by _>.main(argv)``
* ``der bench <name> [args]`` runs ``der_lab.bench.<name>.main(argv)``
* ``der train <name> [args]`` runs the entry in :data:`TRAIN`
* every ``main(argv: list[str]) -> int`` parses its own arguments with argparse.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence

TOP: dict[str, tuple[str, str]] = {
    "demo": ("der_lab.demo:main", "run the main demo on embedded defaults (a few minutes on 2 cores)"),
    "breakeven": ("der_lab.experiments.breakeven:main", "break-even number of inference batches (App. C.1)"),
    "sparsify": ("der.hf.sparsify:main", "HF model folder -> saved block-sparse model + report: der sparsify DIR --out OUT"),
}
TRAIN: dict[str, str] = {"entropynet": "der.geometry.train:main"}
GROUPS: dict[str, str] = {"exp": "der_lab.experiments", "bench": "der_lab.bench"}


LAB = "der_lab"


def _import(mod_name: str):
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if mod_name.split(".")[0] == LAB and e.name in (LAB, mod_name):
            raise SystemExit(f"der: this command needs the package {LAB!r} (experiments and benchmarks), which is "
                             f"not importable ({e}); install the source checkout with `pip install -e .` "
                             "(scripts/setup.sh does)") from e
        raise SystemExit(f"der: cannot import {mod_name} ({e}); is the matching extra installed?") from e


def _load(target: str) -> Callable[[list[str]], int]:
    mod_name, fn_name = target.split(":")
    return getattr(_import(mod_name), fn_name)


def available(group: str) -> list[str]:
    """Names of the subcommands in ``group`` ("exp" or "bench"), found without importing them."""
    if group == "train":
        return sorted(TRAIN)
    pkg = _import(GROUPS[group])
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name != "common"
    )


def _dispatch_group(group: str, argv: list[str]) -> int:
    names = available(group)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: der {group} <name> [args]\n\navailable: {', '.join(names) or '(none)'}")
        return 0
    name = argv[0]
    if name not in names:
        raise SystemExit(f"der {group}: unknown name {name!r}; available: {', '.join(names)}")
    if group == "train":
        target = TRAIN[name]
    else:
        target = f"{GROUPS[group]}.{name.replace('-', '_')}:main"
    return int(_load(target)(argv[1:]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="der",
        description="Differentiable Entropy Regularization: surrogates, geometry, attention, experiments.",
    )
    sub = parser.add_subparsers(dest="cmd", metavar="<command>")
    for name, (_, help_) in TOP.items():
        sub.add_parser(name, help=help_, add_help=False)
    sub.add_parser("exp", help="run an experiment: der exp <name> [--quick]", add_help=False)
    sub.add_parser("bench", help="run a benchmark: der bench <name>", add_help=False)
    sub.add_parser("train", help="train a model: der train entropynet", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in TOP:
        return int(_load(TOP[cmd][0])(rest) or 0)
    if cmd in ("exp", "bench", "train"):
        return _dispatch_group(cmd, rest)
    parser.error(f"unknown command {cmd!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
