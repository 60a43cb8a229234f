"""PCA of visited states with a plain SVD (no scikit-learn needed) (SPEC §5.3)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PCA(NamedTuple):
  """mean (H,); components (K, H) orthonormal rows; explained_variance (K,); explained_variance_ratio (K,)."""
  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray
  explained_variance_ratio: np.ndarray

  def project(self, states) -> np.ndarray:
    """(..., H) -> (..., K) coordinates along the components."""
    return (np.asarray(states, np.float64) - self.mean) @ self.components.T


def pca(states, num_components: int | None = None) -> PCA:
  """Principal components of states (..., H), flattened over the leading axes (e.g. steps x coordinates)."""
  x = np.asarray(states, np.float64)
  x = x.reshape(-1, x.shape[-1])
  x = x[np.all(np.isfinite(x), axis=1)]
  mean = x.mean(axis=0)
  _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
  variance = singular**2 / max(len(x) - 1, 1)
  total = variance.sum()
  ratio = variance / total if total > 0 else np.zeros_like(variance)
  k = len(variance) if num_components is None else min(num_components, len(variance))
  # Fix each component's sign (largest entry positive) so projections are reproducible across runs.
  signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
  vt = vt * np.where(signs == 0, 1, signs)[:, None]
  return PCA(mean, vt[:k], variance[:k], ratio[:k])
