"""Scores for predicted first shells against the true ones.

- first-shell distance MAE (angstrom): |mean predicted bond length - mean true bond length|, averaged over spectra;
  also the MAE over bonds matched in sorted order (up to the smaller CN);
- coordination number: accuracy (exact match) and mean relative error |CN_pred - CN_true| / CN_true;
- bond-angle distribution distance (degrees): 1-Wasserstein distance between the pooled ligand-absorber-ligand angles
  of the predictions and of the truths (``scipy.stats.wasserstein_distance``), plus the per-spectrum mean.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from xtalsolve.local.clusters import FirstShell


def angle_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance (degrees) between two sets of angles; NaN when either is empty."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(wasserstein_distance(a, b))


def _nanmean(x) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def score(pred: list[FirstShell], true: list[FirstShell]) -> dict:
    """Metrics over paired predictions and truths (see module docstring)."""
    if len(pred) != len(true) or not pred:
        raise ValueError("need equally many (>0) predictions and truths")
    cn_p = np.array([p.coordination_number for p in pred])
    cn_t = np.array([t.coordination_number for t in true])
    mean_err = np.array([abs(p.mean_bond_length_A - t.mean_bond_length_A) for p, t in zip(pred, true)])
    bond_err = np.concatenate([np.abs(np.sort(p.bond_lengths_A)[: min(len(p.bond_lengths_A), len(t.bond_lengths_A))]
                                      - np.sort(t.bond_lengths_A)[: min(len(p.bond_lengths_A), len(t.bond_lengths_A))])
                               for p, t in zip(pred, true)])
    per = [angle_distance(p.angles_deg, t.angles_deg) for p, t in zip(pred, true)]
    pooled = angle_distance(np.concatenate([p.angles_deg for p in pred]), np.concatenate([t.angles_deg for t in true]))
    return {
        "n": len(pred),
        "first_shell_mae_A": _nanmean(mean_err),
        "bond_mae_A": float(np.mean(bond_err)) if len(bond_err) else float("nan"),
        "cn_accuracy": float(np.mean(cn_p == cn_t)),
        "cn_error_rate": float(np.mean(cn_p != cn_t)),
        "cn_relative_error": float(np.mean(np.abs(cn_p - cn_t) / np.maximum(cn_t, 1))),
        "angle_w1_pooled_deg": pooled,
        "angle_w1_mean_deg": _nanmean(per),
    }
