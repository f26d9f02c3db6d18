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

    def observe(self, batch, neighbourhood) -> dict:
        return {"centres": batch.centre[:, None], "amplitudes": batch.amplitudes[:, None]}

    def fit(
        self, observations, neighbourhood, noise, params=None, progress=False
    ) -> "CenterOfMass":
        return self

    def transform(self, observations, neighbourhood) -> dict:
        return self.transform_centres(
            observations["centres"][:, 0], observations["amplitudes"][:, 0], neighbourhood
        )

    def transform_centres(self, centres, amplitudes, neighbourhood) -> dict:
        real = neighbourhood.real[centres]
        # slots are ordered by distance from the centre: keep the first N real ones
        nearest = real & (np.cumsum(real, axis=1) <= self.num_channels)
        weights = np.where(nearest, np.clip(amplitudes, 0.0, None), 0.0)
        total = weights.sum(axis=1)
        total = np.where(total > 0, total, 1.0)
        rel = (weights[..., None] * neighbourhood.offsets[centres]).sum(axis=1) / total[:, None]
        xy = neighbourhood.positions[centres] + rel
        nan = np.full(len(centres), np.nan, np.float32)
        return {
            "x": xy[:, 0].astype(np.float32),
            "y": xy[:, 1].astype(np.float32),
            "z": nan,
            "alpha": amplitudes[:, 0].astype(np.float32),
            "x_std": nan,
            "y_std": nan,
            "z_std": nan,
        }
