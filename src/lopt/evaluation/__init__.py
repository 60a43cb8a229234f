"""Evaluation: running optimizers over problem seeds, tuning the baselines, the fair comparison (``compare``)."""
