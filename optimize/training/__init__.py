"""Training, the fourth layer (imports base, data, evaluation): the Lightning base every trained method shares (EMA,
clock, loss history, NaN stop, progress: ``runs.TrainingModule``), safe resume (``checkpoints``), and what distillation
methods share (``distill``: the teacher's fine solve as targets, a one-step student's table)."""
