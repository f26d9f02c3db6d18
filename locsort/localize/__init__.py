"""Spike localization methods. Each is an object with ``fit(sample, neighbourhood, noise,
params)`` (learn from a bounded sample of the recording's spikes) and ``transform(batch,
neighbourhood) -> dict`` of per-spike x, y, z, alpha, x_std, y_std, z_std (µm, SpikeInterface
frame)."""

from __future__ import annotations

from ..errors import UsageError
from ..params import Params
from .baseline import CenterOfMass

METHODS = ("center_of_mass",)


def make_localizer(method: str, params: Params):
    if method == "center_of_mass":
        return CenterOfMass(params.com_channels)
    raise UsageError(f"unknown localization method {method!r}: use one of {', '.join(METHODS)}")
