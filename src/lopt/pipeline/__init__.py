"""Orchestration of whole jobs (``lopt analyze``, ``lopt reproduce``): files and tasks in, analyses and reports out.
Rendering lives in ``lopt.report``; computation in ``lopt.dynamics``, ``lopt.meta`` and ``lopt.evaluation``."""
