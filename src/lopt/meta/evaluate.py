"""Compatibility alias: evaluation lives in ``lopt.evaluation.compare`` (this name is the same module object)."""

import sys

from lopt.evaluation import compare as _compare

sys.modules[__name__] = _compare
