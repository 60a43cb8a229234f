"""Compatibility alias: the optax adapter lives in ``lopt.optax_adapter`` (this name is the same module object)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lopt.optax_adapter")
