"""Spike localization methods, interchangeable objects with three steps:

- ``observe(batch, neighbourhood) -> dict``: per-spike arrays taken while the chunk's traces
  are in memory (centre channels and neighbourhood amplitudes);
- ``fit(observations, neighbourhood, noise, params, progress)``: learn from a bounded sample;
- ``transform(observations, neighbourhood) -> dict``: per-spike x, y, z, alpha, x_std, y_std,
  z_std (µm, SpikeInterface frame; NaN where the method has no such output).
"""

from __future__ import annotations

from ..errors import UsageError
from ..params import Params
from .baseline import CenterOfMass

METHODS = ("locsort", "center_of_mass")


def make_localizer(method: str, params: Params):
    from ..params import resolve_device

    if method == "center_of_mass":
        return CenterOfMass(params.constants.com_channels)
    if method == "locsort":
        from .amortized import AmortizedLocalizer
        from .model import DECAY_LAWS

        if params.constants.decay_law not in DECAY_LAWS:
            raise UsageError(
                f"unknown decay_law {params.constants.decay_law!r}: "
                f"use one of {', '.join(DECAY_LAWS)}"
            )

        if params.constants.encoder_init_epochs < 1:
            raise UsageError(
                "encoder_init_epochs must be at least 1 "
                f"(got {params.constants.encoder_init_epochs}); to use a trained "
                "encoder as it is, give it as encoder_path"
            )
        if params.encoder_path:
            return AmortizedLocalizer.load(
                params.encoder_path, device=resolve_device(params.device)
            )
        return AmortizedLocalizer(
            decay=params.constants.decay_law,
            source_offset_um=params.constants.source_offset_um,
            jitter_uv=params.constants.jitter_uv,
            max_centres=params.constants.max_jitter_centres,
            hidden=params.constants.encoder_hidden,
            batch_size=params.constants.encoder_batch_size,
            max_epochs=params.constants.encoder_max_epochs,
            patience=params.constants.encoder_patience,
            lr=params.constants.encoder_lr,
            min_training_spikes=params.constants.min_training_spikes,
            min_channels=params.constants.localize_min_channels,
            fallback_channels=params.constants.com_channels,
            device=resolve_device(params.device),
            seed=params.seed,
            init=params.encoder_init,
            init_epochs=params.constants.encoder_init_epochs,
        )
    raise UsageError(f"unknown localization method {method!r}: use one of {', '.join(METHODS)}")
