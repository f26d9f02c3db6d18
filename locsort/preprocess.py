"""Band-pass, interpolation of bad channels and common reference through SpikeInterface
(lazy: nothing is computed here but the search for bad channels), and the per-channel noise
level every later threshold is expressed in."""

from __future__ import annotations

import numpy as np

from .errors import LocsortError, UsageError
from .params import Params


def band_pass(recording, params: Params | None = None):
    """The recording in µV as float32, band-passed per ``params`` (lazy)."""
    import spikeinterface.preprocessing as spre

    params = params or Params()
    if recording.has_scaleable_traces() and not np.allclose(recording.get_channel_gains(), 1.0):
        recording = spre.scale_to_uV(recording)
    if recording.get_dtype() != np.float32:
        recording = spre.astype(recording, "float32")
    if params.preprocess:
        nyquist = recording.get_sampling_frequency() / 2
        freq_max = min(params.freq_max, 0.95 * nyquist)
        recording = spre.bandpass_filter(
            recording,
            freq_min=params.freq_min,
            freq_max=freq_max,
            dtype="float32",
        )
    return recording


def find_bad_channels(
    filtered, params: Params | None = None, slices: list[np.ndarray] | None = None
) -> dict:
    """Channels to interpolate from their neighbours, channel id -> why: those
    ``params.bad_channels`` names, or with "auto" the flat and the very noisy ones. A channel's
    noise level is read on the band-passed traces ``filtered`` (band_pass; or on their noise
    ``slices``), before the common reference, which would give a flat channel the others' common
    signal."""
    params = params or Params()
    ids = list(filtered.channel_ids)
    if params.bad_channels is None:
        return {}
    setting = params.bad_channels.strip()
    if setting != "auto":
        given = [c.strip() for c in setting.split(",") if c.strip()]
        by_name = {str(c): c for c in ids}
        unknown = [c for c in given if c not in by_name]
        if unknown:
            raise UsageError(
                f"bad_channels names channels the recording does not have: {', '.join(unknown)} "
                f"(its channel ids: {', '.join(map(str, ids[:8]))}"
                f"{' ...' if len(ids) > 8 else ''})"
            )
        return {by_name[c]: "named in bad_channels" for c in given}
    if len(ids) < 4:  # too few channels for a median to say what a normal channel is
        return {}
    # a handful of slices tells flat and noisy channels apart (healthy channels' levels stay
    # close to the median) at a quarter of the cost of all (docs/design-decisions.md,
    # § Preprocessing)
    levels = noise_levels(filtered, params, slices[:5] if slices is not None else None)
    if not np.any(levels > 0):
        raise LocsortError(
            "every channel is flat: the recording holds no signal "
            "(check the file, its data offset, dtype and channel count)"
        )
    typical = float(np.median(levels))
    bad = {}
    for channel, level in zip(ids, levels / max(typical, 1e-12)):
        if level < params.constants.bad_channel_flat:
            bad[channel] = f"flat, noise {level:.2f} x the median channel's"
        elif level > params.constants.bad_channel_noisy:
            bad[channel] = f"noisy, noise {level:.1f} x the median channel's"
    return bad


def preprocess(recording, params: Params | None = None, bad_channels=None):
    """The recording in µV as float32: band-passed, ``bad_channels`` (ids; None: find_bad_channels
    decides) interpolated from their neighbours, common-referenced, per ``params``."""
    params = params or Params()
    filtered = band_pass(recording, params)
    return referenced(
        filtered,
        params,
        find_bad_channels(filtered, params) if bad_channels is None else bad_channels,
    )


def referenced(filtered, params: Params, bad_channels):
    """The band-passed recording with ``bad_channels`` interpolated and the common reference
    removed (lazy)."""
    import spikeinterface.preprocessing as spre

    recording = filtered
    if len(bad_channels):
        if len(bad_channels) > recording.get_num_channels() // 2:
            raise LocsortError(
                f"{len(bad_channels)} of {recording.get_num_channels()} channels are flat or noisy "
                f"({', '.join(map(str, list(bad_channels)[:8]))} ...): "
                "too few good ones to interpolate them from; "
                "check the recording and its probe file, or set bad_channels"
            )
        # kriging from the neighbouring channels (SpikeInterface's, as in the IBL pipeline): the
        # channel count and indices stay, so outputs refer to the recording's own channels
        recording = spre.interpolate_bad_channels(recording, bad_channel_ids=list(bad_channels))
    if params.preprocess and params.common_reference is not None:
        if not reference_skipped(recording.get_num_channels(), params):
            recording = spre.common_reference(
                recording, reference="global", operator=params.common_reference
            )
    return recording


def reference_skipped(num_channels: int, params: Params) -> str:
    """Why the common reference is left out on a probe this small (else ""): on few channels
    a spike reaches most of them, so their median carries the spike and removing it would
    erase the spike itself."""
    minimum = params.constants.reference_min_channels
    if not params.preprocess or params.common_reference is None or num_channels >= minimum:
        return ""
    return (
        f"no common reference: the probe has {num_channels} "
        f"channel{'s' if num_channels > 1 else ''}, and at least {minimum} "
        "are needed for their common signal to be free of each spike"
    )


def referenced_slices(
    slices: list[np.ndarray], filtered, params: Params, bad_channels
) -> list[np.ndarray]:
    """``referenced`` applied to noise slices already read from ``filtered``: the processed
    recording's own noise slices (both steps act sample by sample), without band-passing them
    twice."""
    from spikeinterface.core import NumpyRecording

    if not len(bad_channels) and not (params.preprocess and params.common_reference is not None):
        return slices
    pieces = NumpyRecording(
        slices,
        sampling_frequency=filtered.get_sampling_frequency(),
        channel_ids=filtered.channel_ids,
    )
    pieces.set_dummy_probe_from_locations(filtered.get_channel_locations())
    pieces = referenced(pieces, params, bad_channels)
    return _in_threads(lambda i: pieces.get_traces(segment_index=i), list(range(len(slices))))


def noise_slices(recording, params: Params | None = None) -> list[np.ndarray]:
    """Random slices (T, C) µV of the preprocessed traces, the ones SpikeInterface's
    ``get_noise_levels`` would read (its slice length, count and seed)."""
    from spikeinterface.core.recording_tools import get_random_sample_slices

    params = params or Params()
    shortest = min(recording.get_num_samples(s) for s in range(recording.get_num_segments()))
    chunk = int(min(10_000, shortest))  # SpikeInterface's default slice length
    num_chunks = max(1, min(params.constants.noise_chunks, shortest // max(chunk, 1)))
    slices = get_random_sample_slices(
        recording, num_chunks_per_segment=num_chunks, chunk_size=chunk, seed=params.seed
    )
    return _in_threads(
        lambda where: recording.get_traces(
            segment_index=where[0], start_frame=where[1], end_frame=where[2], return_in_uV=False
        ),
        slices,
    )


def _in_threads(function, items: list) -> list:
    """[function(item) for item in items], items spread over one thread per core (filtering and
    medians release the GIL, so the threads run in parallel)."""
    from .runners import LocalRunner

    done = dict(LocalRunner().map(function, items, list(range(len(items))), progress=False))
    return [done[i] for i in range(len(items))]


def noise_levels(
    recording, params: Params | None = None, slices: list[np.ndarray] | None = None
) -> np.ndarray:
    """Per-channel noise SD (MAD / 0.6745, averaged over random slices, as SpikeInterface's
    ``get_noise_levels``) of the preprocessed traces."""
    slices = slices if slices is not None else noise_slices(recording, params)
    levels = (
        np.mean(_in_threads(lambda t: _mad(np.ascontiguousarray(t.T)), slices), axis=0)
        / 0.6744897501960817
    )
    levels = np.asarray(levels, dtype=np.float32)
    if not np.all(np.isfinite(levels)):
        raise LocsortError(
            "the recording contains NaN or Inf samples; clean or interpolate them before sorting"
        )
    return levels


def _mad(rows: np.ndarray) -> np.ndarray:
    """Median absolute deviation of each row: channels as rows keep the medians' partitions in
    contiguous memory (faster than a slice read as time x channels; same values)."""
    return np.median(np.abs(rows - np.median(rows, axis=1)[:, None]), axis=1)


def noise_correlations(
    slices: list[np.ndarray], noise: np.ndarray, max_lag: int, max_samples: int = 30_000
) -> tuple[np.ndarray, np.ndarray]:
    """(C, C) covariance (µV²) across channels and (max_lag + 1,) autocorrelation in time of the
    noise, from the noise slices clipped at 4 SDs (spikes in the slices would otherwise count as
    noise). Noise on dense probes is spatially correlated (distance-correlated noise in
    simulators, residual common noise on real probes), so a template's match with noise alone is
    much wider than per-channel noise levels say; sort/peel.Significance needs both."""
    parts, taken = [], 0
    for traces in slices:
        if taken >= max_samples:
            break
        # C order: the lagged row slices below are then views (SpikeInterface may return
        # Fortran-ordered traces, whose row slices ravel into copies, which cost most of the time)
        part = np.clip(
            np.ascontiguousarray(traces[: max_samples - taken], dtype=np.float64),
            -4 * noise,
            4 * noise,
        )
        parts.append(part - part.mean(axis=0))
        taken += len(part)
    if not parts or taken <= max_lag + 1:
        return np.diag(noise.astype(np.float64) ** 2), np.eye(1, max_lag + 1)[0]
    covariance = sum(p.T @ p for p in parts) / taken
    white = [p / np.sqrt(np.maximum(np.diag(covariance), 1e-12)) for p in parts]
    # lagged products summed over time and channels: one BLAS dot per lag on contiguous views
    # (several times faster than elementwise products per lag)
    sums = np.array(
        [
            sum(np.vdot(w[: len(w) - lag].ravel(), w[lag:].ravel()) for w in white)
            for lag in range(max_lag + 1)
        ]
    )
    counts = np.array(
        [sum(max(len(w) - lag, 1) * w.shape[1] for w in white) for lag in range(max_lag + 1)]
    )
    autocorrelation = sums / counts
    return covariance, autocorrelation / autocorrelation[0]
