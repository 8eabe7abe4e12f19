"""Generated docs from the result JSON: ``python -m der_lab.report.claims`` writes docs/claims.md,
``python -m der_lab.report.experiment_tables`` the measured section of docs/experiments.md."""

__all__: list[str] = []
