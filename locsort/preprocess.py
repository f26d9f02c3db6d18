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


def noise_slices(recording, params: Params | None = None) -> list[np.ndarray]:
    """Random slices (T, C) µV of the preprocessed traces, the ones SpikeInterface's
    ``get_noise_levels`` would read (its slice length, count and seed)."""
    from spikeinterface.core.recording_tools import get_random_sample_slices

    params = params or Params()
    shortest = min(recording.get_num_samples(s) for s in range(recording.get_num_segments()))
    chunk = int(min(10_000, shortest))  # SpikeInterface's default slice length
    num_chunks = max(1, min(params.noise_chunks, shortest // max(chunk, 1)))
    slices = get_random_sample_slices(recording, num_chunks_per_segment=num_chunks, chunk_size=chunk, seed=params.seed)
    return [recording.get_traces(segment_index=segment, start_frame=start, end_frame=end, return_in_uV=False)
            for segment, start, end in slices]


def noise_levels(recording, params: Params | None = None, slices: list[np.ndarray] | None = None) -> np.ndarray:
    """Per-channel noise SD (MAD / 0.6745, averaged over random slices, as SpikeInterface's
    ``get_noise_levels``) of the preprocessed traces."""
    slices = slices if slices is not None else noise_slices(recording, params)
    levels = np.mean([np.median(np.abs(t - np.median(t, axis=0)), axis=0) for t in slices], axis=0) / 0.6744897501960817
    levels = np.asarray(levels, dtype=np.float32)
    if not np.all(np.isfinite(levels)):
        raise LocsortError("the recording contains NaN or Inf samples; clean or interpolate them before sorting")
    return levels


def noise_correlations(slices: list[np.ndarray], noise: np.ndarray, max_lag: int,
                       max_samples: int = 30_000) -> tuple[np.ndarray, np.ndarray]:
    """(C, C) covariance (µV²) across channels and (max_lag + 1,) autocorrelation in time of the
    noise, from the noise slices clipped at 4 SDs (spikes in the slices would otherwise count as
    noise). Noise on dense probes is spatially correlated (MEArec's distance-correlated noise,
    residual common noise on real probes), so a template's match with noise alone is much
    wider than per-channel noise levels say; sort/peel.Significance needs both."""
    parts, taken = [], 0
    for traces in slices:
        if taken >= max_samples:
            break
        # C order: the lagged row slices below are then views (SpikeInterface may return Fortran-ordered
        # traces, whose row slices ravel into copies: 0.9 of 1.1 s on 128 channels)
        part = np.clip(np.ascontiguousarray(traces[: max_samples - taken], dtype=np.float64), -4 * noise, 4 * noise)
        parts.append(part - part.mean(axis=0))
        taken += len(part)
    if not parts or taken <= max_lag + 1:
        return np.diag(noise.astype(np.float64) ** 2), np.eye(1, max_lag + 1)[0]
    covariance = sum(p.T @ p for p in parts) / taken
    white = [p / np.sqrt(np.maximum(np.diag(covariance), 1e-12)) for p in parts]
    # lagged products summed over time and channels: one BLAS dot per lag on contiguous views
    # (elementwise products per lag took 1.2 s on 384 channels, this 0.2 s)
    sums = np.array([sum(np.vdot(w[: len(w) - lag].ravel(), w[lag:].ravel()) for w in white) for lag in range(max_lag + 1)])
    counts = np.array([sum(max(len(w) - lag, 1) * w.shape[1] for w in white) for lag in range(max_lag + 1)])
    autocorrelation = sums / counts
    return covariance, autocorrelation / autocorrelation[0]
