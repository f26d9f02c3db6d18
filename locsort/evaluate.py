"""Comparisons with ground truth: localization error and sorting accuracy."""

from __future__ import annotations

import numpy as np

from .simulate import GroundTruth


def unit_peak_channels(
    recording, ground_truth: GroundTruth, spikes_per_unit: int = 50, seed: int = 0
) -> np.ndarray:
    """The largest (most negative) channel of each true unit's waveform: the per-channel median,
    over up to ``spikes_per_unit`` of its spikes, of the minimum within +/- 0.5 ms (a median so
    that overlapping spikes of other units do not decide it; bounded reads)."""
    from .chunks import make_chunks, read_chunk

    fs = recording.get_sampling_frequency()
    half = int(round(fs / 2000))  # +/- 0.5 ms
    vector = ground_truth.sorting.to_spike_vector()
    rng = np.random.default_rng(seed)
    picked = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(vector["unit_index"] == u),
                size=min(spikes_per_unit, int(np.sum(vector["unit_index"] == u))),
                replace=False,
            )
            for u in range(len(ground_truth.sorting.unit_ids))
        ]
    ).astype(np.int64)
    spikes = vector[picked]
    minima = np.zeros((len(spikes), recording.get_num_channels()), np.float32)
    for chunk in make_chunks(recording, int(fs)):  # one read per chunk that holds picked spikes
        inside = np.flatnonzero(
            (spikes["segment_index"] == chunk.segment_index)
            & (spikes["sample_index"] >= chunk.start)
            & (spikes["sample_index"] < chunk.end)
        )
        if len(inside) == 0:
            continue
        traces, first = read_chunk(recording, chunk, half)
        rows = np.clip(spikes["sample_index"][inside] - first, half, len(traces) - half - 1)
        window = traces[rows[:, None] + np.arange(-half, half + 1)[None, :]]  # (n, W, C)
        minima[inside] = window.min(axis=1)
    channels = np.zeros(len(ground_truth.sorting.unit_ids), dtype=np.int64)
    for unit in range(len(channels)):
        mine = spikes["unit_index"] == unit
        if mine.any():
            channels[unit] = int(np.argmin(np.median(minima[mine], axis=0)))
    return channels


def ground_truth_peaks(recording, ground_truth: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """Peaks at the true spike times on each unit's largest channel, and the true (x, y, z) of
    each peak's unit: localization judged apart from detection."""
    from .spikes import PEAK_DTYPE

    unit_channel = unit_peak_channels(recording, ground_truth)
    vector = ground_truth.sorting.to_spike_vector()
    peaks = np.zeros(len(vector), PEAK_DTYPE)
    peaks["sample_index"] = vector["sample_index"]
    peaks["segment_index"] = vector["segment_index"]
    peaks["channel_index"] = unit_channel[vector["unit_index"]]
    return peaks, ground_truth.unit_locations[vector["unit_index"]]


def match_spikes(
    spikes: np.ndarray, recording, ground_truth: GroundTruth, tolerance_ms: float = 0.4
):
    """For each true spike, the detected spike within ``tolerance_ms`` whose centre channel is
    nearest to the true unit (-1 if none within 50 µm). Returns (gt_unit_index, matched index)."""
    fs = recording.get_sampling_frequency()
    tol = int(round(tolerance_ms * fs / 1000))
    vector = ground_truth.sorting.to_spike_vector()
    matched = np.full(len(vector), -1, dtype=np.int64)
    channel_xy = recording.get_channel_locations()[:, :2]
    for segment in np.unique(vector["segment_index"]):
        gt_idx = np.flatnonzero(vector["segment_index"] == segment)
        det_idx = np.flatnonzero(spikes["segment_index"] == segment)
        det_idx = det_idx[np.argsort(spikes["sample_index"][det_idx], kind="stable")]
        times = spikes["sample_index"][det_idx]
        lo = np.searchsorted(times, vector["sample_index"][gt_idx] - tol, side="left")
        hi = np.searchsorted(times, vector["sample_index"][gt_idx] + tol, side="right")
        target = ground_truth.unit_locations[vector["unit_index"][gt_idx], :2]
        best = np.full(len(gt_idx), np.inf)
        for k in range(int((hi - lo).max(initial=0))):
            j = lo + k
            ok = j < hi
            cand = det_idx[np.minimum(j, len(det_idx) - 1)]
            d = np.linalg.norm(channel_xy[spikes["channel_index"][cand]] - target, axis=1)
            better = ok & (d < best) & (d <= 50.0)
            best[better] = d[better]
            matched[gt_idx[better]] = cand[better]
    return vector["unit_index"], matched


def localization_errors(spikes: np.ndarray, true_xyz: np.ndarray) -> dict:
    """2-D (x, y) and z errors of ``spikes`` against ``true_xyz`` (same length)."""
    err_xy = np.hypot(spikes["x"] - true_xyz[:, 0], spikes["y"] - true_xyz[:, 1])
    err_xy = err_xy[np.isfinite(err_xy)]
    err_z = np.abs(spikes["z"] - true_xyz[:, 2])
    err_z = err_z[np.isfinite(err_z)]
    out = {
        "n": int(len(err_xy)),
        "median_xy_um": float(np.median(err_xy)) if len(err_xy) else float("nan"),
        "mean_xy_um": float(np.mean(err_xy)) if len(err_xy) else float("nan"),
        "sd_xy_um": float(np.std(err_xy)) if len(err_xy) else float("nan"),
    }
    if len(err_z):
        out["median_z_um"] = float(np.median(err_z))
    return out


def detected_localization_errors(spikes, recording, ground_truth: GroundTruth) -> dict:
    """Localization error of the detected spikes that match a true spike."""
    units, matched = match_spikes(spikes, recording, ground_truth)
    ok = matched >= 0
    result = localization_errors(spikes[matched[ok]], ground_truth.unit_locations[units[ok]])
    result["detected_fraction"] = float(ok.mean()) if len(ok) else float("nan")
    return result


def sorting_accuracy(sorting, ground_truth: GroundTruth) -> dict:
    """SpikeInterface's comparison (0.4 ms, Hungarian matching): per-unit accuracy and counts."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    comparison = compare_sorter_to_ground_truth(ground_truth.sorting, sorting, exhaustive_gt=True)
    accuracy = comparison.get_performance()["accuracy"].to_numpy(dtype=float)
    return {
        "mean_accuracy": float(np.mean(accuracy)) if len(accuracy) else float("nan"),
        "well_detected": int(np.sum(accuracy >= 0.8)),
        "num_gt_units": int(len(accuracy)),
        "num_units": int(len(sorting.unit_ids)),
        "false_positive_units": int(comparison.count_false_positive_units()),
        "accuracy_per_unit": accuracy.tolist(),
    }
