"""Band-pass and common reference through SpikeInterface (lazy: nothing is computed here),
and the per-channel noise level every later threshold is expressed in."""

from __future__ import annotations

import numpy as np

from .errors import LocsortError
from .params import Params


def preprocess(recording, params: Params | None = None):
    """The recording in µV as float32, band-passed and common-referenced per ``params``."""
    import spikeinterface.preprocessing as spre

    params = params or Params()
    if recording.has_scaleable_traces() and not np.allclose(recording.get_channel_gains(), 1.0):
        recording = spre.scale_to_uV(recording)
    if recording.get_dtype() != np.float32:
        recording = spre.astype(recording, "float32")
    if params.preprocess:
        nyquist = recording.get_sampling_frequency() / 2
        freq_max = min(params.freq_max, 0.95 * nyquist)
        recording = spre.bandpass_filter(recording, freq_min=params.freq_min, freq_max=freq_max, dtype="float32",
                                         direction=params.filter_direction)
        if params.common_reference != "none":
            recording = spre.common_reference(recording, reference="global", operator=params.common_reference)
    return recording


def noise_levels(recording, params: Params | None = None) -> np.ndarray:
    """Per-channel noise SD (MAD / 0.6745) of the preprocessed traces, from random chunks."""
    from spikeinterface.core import get_noise_levels

    params = params or Params()
    shortest = min(recording.get_num_samples(s) for s in range(recording.get_num_segments()))
    chunk = int(min(10_000, shortest))  # SpikeInterface's default slice length
    num_chunks = max(1, min(params.noise_chunks, shortest // max(chunk, 1)))
    levels = get_noise_levels(
        recording,
        return_in_uV=False,
        method="mad",
        random_slices_kwargs=dict(num_chunks_per_segment=num_chunks, chunk_size=chunk, seed=params.seed),
        progress_bar=False,
    )
    levels = np.asarray(levels, dtype=np.float32)
    if not np.all(np.isfinite(levels)):
        raise LocsortError("the recording contains NaN or Inf samples; clean or interpolate them before sorting")
    return levels
