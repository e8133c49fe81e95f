"""Evaluation, the third layer (imports base, data): metrics with their uncertainties (``metrics``), feature nets and
the judge (``classifier``, ``judge``), result files, paired differences and plots (``results``, ``report``), and the
one entry point every method, command and script evaluates through: ``evaluate.evaluate_jobs`` (``evaluate.evaluate``
for a single model)."""
