"""Offline datasets: everything ships inside installed packages or is a local file the user names."""

from lopt.data.datasets import DataFileError, Dataset, digits, load_mnist, moons, split

__all__ = ["DataFileError", "Dataset", "digits", "load_mnist", "moons", "split"]
