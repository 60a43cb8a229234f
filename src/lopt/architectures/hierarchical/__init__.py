"""The hierarchical optimizer (Metz et al. 2020): ``spec`` (fields, shapes; JAX-free), ``optimizer`` (JAX),
``torch``."""

from lopt.architectures.hierarchical.spec import SPEC

__all__ = ["SPEC"]
