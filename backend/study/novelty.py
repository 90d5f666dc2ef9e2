"""A novelty score: how unlike anything it was trained on a wafer looks to the model.

Layer L0 (numpy only). Softmax can be confidently wrong on a pattern the model never saw, because
it only compares the known failure types with each other. The energy score (Liu et al. 2020),
``-T * logsumexp(logits / T)``, also looks at how strongly the network responds at all: wafers
like the training data get large logits (low energy), unfamiliar ones small (high energy). A
wafer whose energy is above a high quantile of the held-out wafers' energies goes to an engineer
whatever its softmax says.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: The held-out quantile above which a wafer counts as novel.
NOVELTY_QUANTILE = 0.995


def energy(logits: npt.ArrayLike, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """``-T logsumexp(logits / T)`` per wafer; higher = less like the training data."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits must be (wafers, classes), got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not len(z):
        return np.zeros(0, dtype=np.float64)
    s = z / temperature
    top = s.max(axis=1)
    return np.asarray(
        -temperature * (top + np.log(np.exp(s - top[:, None]).sum(axis=1))), dtype=np.float64
    )


def novelty_cut(held_out_energy: npt.ArrayLike, quantile: float = NOVELTY_QUANTILE) -> float:
    """The energy above which a wafer is novel: ``quantile`` of the held-out wafers' energies.

    No held-out wafers gives +inf (nothing is novel).
    """
    e = np.asarray(held_out_energy, dtype=np.float64)
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    if not e.size:
        return float("inf")
    return float(np.quantile(e, quantile, method="higher"))


def is_novel(wafer_energy: npt.ArrayLike, cut: float) -> npt.NDArray[np.bool_]:
    """True for wafers whose energy is strictly above ``cut``."""
    return np.asarray(np.asarray(wafer_energy, dtype=np.float64) > cut, dtype=np.bool_)
