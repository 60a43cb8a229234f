"""Compatibility alias of ``lopt.architectures.gru.optimizer`` (this name is the same module object)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lopt.architectures.gru.optimizer")
