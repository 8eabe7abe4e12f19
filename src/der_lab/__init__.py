"""der_lab: the experiments, benchmarks and report generation of the ``der`` repository.

Not part of the library: ``der`` never imports it. ``der exp <name>``, ``der bench <name>`` and ``der demo``
dispatch here. Subpackages: :mod:`der_lab.experiments`, :mod:`der_lab.bench`, :mod:`der_lab.report`;
the shared pieces (results folder, atomic JSON, timer, bootstrap) are in :mod:`der_lab.harness`.
"""

__all__: list[str] = []
