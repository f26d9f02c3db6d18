"""Centre of mass: the baseline every localizer is compared with.

The amplitude-weighted mean position of the N real channels nearest to the centre channel
(N = 4, 9, 16, 25 in the localization paper's table). It cannot place a source outside the
hull of those channels, which is why it pulls edge spikes inward; it has no depth and no
posterior, so z and the *_std fields are NaN.
"""

from __future__ import annotations

import numpy as np


class CenterOfMass:
    name = "center_of_mass"

    def __init__(self, num_channels: int = 9):
        self.num_channels = int(num_channels)

    def fit(self, sample, neighbourhood, noise, params=None, progress=False) -> "CenterOfMass":
        return self

    def transform(self, batch, neighbourhood) -> dict:
        real = neighbourhood.real[batch.centre]
        # slots are ordered by distance from the centre: keep the first N real ones
        nearest = real & (np.cumsum(real, axis=1) <= self.num_channels)
        weights = np.where(nearest, np.clip(batch.amplitudes, 0.0, None), 0.0)
        total = weights.sum(axis=1)
        total = np.where(total > 0, total, 1.0)
        offsets = neighbourhood.offsets[batch.centre]
        rel = (weights[..., None] * offsets).sum(axis=1) / total[:, None]
        xy = neighbourhood.positions[batch.centre] + rel
        n = len(batch.centre)
        nan = np.full(n, np.nan, np.float32)
        return {
            "x": xy[:, 0].astype(np.float32),
            "y": xy[:, 1].astype(np.float32),
            "z": nan,
            "alpha": batch.amplitudes[:, 0].astype(np.float32),
            "x_std": nan,
            "y_std": nan,
            "z_std": nan,
        }
