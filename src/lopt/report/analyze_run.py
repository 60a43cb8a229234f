"""Compatibility alias of ``lopt.pipeline.analyze``, where ``lopt analyze`` lives (the same module object)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lopt.pipeline.analyze")
