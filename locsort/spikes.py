"""The one record type that flows between pipeline stages and is written to ``spikes.npy``.

Coordinates are in µm in SpikeInterface's frame: x, y in the probe plane (y along the shank),
z away from the probe plane (z >= 0). ``alpha`` is the source amplitude of the point-source
model (µV at zero distance for the exponential law, µV·µm for the monopole law) and
``amplitude`` the trace value at the peak on ``channel_index`` (signed µV, negative for the
negative spikes locsort detects, as in SpikeInterface's peaks).
``*_std`` are posterior standard deviations where the method gives a posterior, NaN
otherwise. ``unit_index`` is -1 where the spike was not assigned to a unit.

``x, y, z`` are where the spike was on the probe when it fired (the recorded position).
``y_registered`` is its depth with the probe's motion removed (``locsort.motion``): the depth
it would have had without drift, at the reference position of the probe (the motion's median).
It equals ``y`` when no motion was corrected. Motion is along the depth only, so x and z need
no registered twin.
"""

import numpy as np

SPIKE_DTYPE = np.dtype(
    [
        ("sample_index", "int64"),
        ("segment_index", "int32"),
        ("channel_index", "int32"),
        ("amplitude", "float32"),
        ("x", "float32"),
        ("y", "float32"),
        ("z", "float32"),
        ("alpha", "float32"),
        ("x_std", "float32"),
        ("y_std", "float32"),
        ("z_std", "float32"),
        ("y_registered", "float32"),
        ("unit_index", "int32"),
    ]
)

# SpikeInterface's peak dtype (spikeinterface.sortingcomponents.peak_detection.base_peak_dtype)
PEAK_DTYPE = np.dtype(
    [
        ("sample_index", "int64"),
        ("channel_index", "int64"),
        ("amplitude", "float64"),
        ("segment_index", "int64"),
    ]
)

LOCATION_FIELDS = ("x", "y", "z", "alpha", "x_std", "y_std", "z_std")


def empty_spikes(n: int) -> np.ndarray:
    """``n`` spike records with NaN locations and no unit."""
    spikes = np.zeros(n, dtype=SPIKE_DTYPE)
    for name in LOCATION_FIELDS + ("y_registered",):
        spikes[name] = np.nan
    spikes["unit_index"] = -1
    return spikes


def spikes_from_peaks(peaks: np.ndarray) -> np.ndarray:
    """Spike records for SpikeInterface-style peaks, one to one and in the same order."""
    spikes = empty_spikes(len(peaks))
    for name in ("sample_index", "segment_index", "channel_index", "amplitude"):
        spikes[name] = peaks[name]
    return spikes


def peaks_from_spikes(spikes: np.ndarray) -> np.ndarray:
    peaks = np.zeros(len(spikes), dtype=PEAK_DTYPE)
    for name in PEAK_DTYPE.names:
        peaks[name] = spikes[name]
    return peaks


def check_peaks(peaks: np.ndarray, num_channels: int, num_segments: int) -> np.ndarray:
    """Validate caller-given peaks; return them as PEAK_DTYPE (same order)."""
    from .errors import UsageError

    peaks = np.asarray(peaks)
    missing = [
        f
        for f in ("sample_index", "channel_index")
        if peaks.dtype.names is None or f not in peaks.dtype.names
    ]
    if missing:
        raise UsageError(
            f"peaks need the fields sample_index and channel_index (missing: {', '.join(missing)})"
        )
    out = np.zeros(len(peaks), dtype=PEAK_DTYPE)
    for name in PEAK_DTYPE.names:
        if name in peaks.dtype.names:
            out[name] = peaks[name]
    bad = (out["channel_index"] < 0) | (out["channel_index"] >= num_channels)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UsageError(
            f"peak {i} has channel_index {out['channel_index'][i]} but the recording has "
            f"{num_channels} channels (valid: 0..{num_channels - 1})"
        )
    if ((out["segment_index"] < 0) | (out["segment_index"] >= num_segments)).any():
        raise UsageError(f"peaks have a segment_index outside 0..{num_segments - 1}")
    return out
