"""Compatibility alias: the hand-designed baselines live in ``lopt.baselines`` (this name is the same module object)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lopt.baselines")
