"""Stage 3b: the probe's motion, estimated from locsort's own spikes, and the recording
registered with it.

The estimate is DREDge (SpikeInterface's ``estimate_motion(method="dredge_ap")``, Windolf et
al. 2023) run on every spike's posterior depth, weighted by its amplitude, with a shorter
temporal smoothing than DREDge's default (docs/design-decisions.md, § Motion). Registration is
SpikeInterface's ``interpolate_motion`` (kriging of the preprocessed traces in each chunk),
after which every later stage (sample, localizer, clustering, neural sorter, peeling) sees a
still probe.

Motion is along the probe's depth (y) and follows SpikeInterface's convention: a spike
recorded at depth ``y`` at time ``t`` sits at ``y - d(t, y)`` in the registered frame, and
the registered traces at a channel's depth ``p`` are the recorded ones at ``p + d(t, p)``.
Shanks of a multi-shank probe share one estimate: the brain moves against the whole probe, and
one estimate from every shank's spikes is steadier than one per shank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .errors import LocsortError, UsageError
from .neighbourhood import shank_ids
from .sort.labels import segment_offsets

MOTION_MODES = ("auto", "rigid", "nonrigid")
METHOD = "DREDge (SpikeInterface dredge_ap) on locsort's posterior depths"


@dataclass
class MotionInfo:
    """What a run says about motion (run.json ``motion``).

    mode : the parameter's value ("auto", "rigid", "nonrigid", a folder, or None)
    applied : whether the recording was registered
    method : how the motion was found ("" when not estimated)
    rigid : one displacement for the whole probe (None: not estimated)
    max_um, rms_um : the largest and the RMS displacement after removing its median
    note : why motion was skipped or estimated otherwise than asked
    """

    mode: str | None
    applied: bool = False
    method: str = ""
    rigid: bool | None = None
    max_um: float | None = None
    rms_um: float | None = None
    note: str = ""

    def asdict(self) -> dict:
        return asdict(self)


def plan(recording, mode: str | None, constants) -> tuple[bool | None, str]:
    """(rigid, note): whether the estimate is rigid for ``mode`` on this probe, None when the
    probe cannot show motion along its depth (and the note says why)."""
    depths = recording.get_channel_locations()[:, 1]
    rows = len(np.unique(np.round(depths, 1)))
    if rows < constants.motion_min_rows:
        return None, (
            f"motion not estimated: the probe has {rows} row(s) of contacts along its depth, "
            f"and at least {constants.motion_min_rows} are needed to follow spikes along it"
        )
    if mode == "auto":
        shanks, _ = shank_ids(recording, constants.shank_gap_um)
        positions = recording.get_channel_locations()
        tall = [np.ptp(positions[shanks == s], axis=0) for s in np.unique(shanks)]
        aspect = max(h / max(w, 1.0) for w, h in tall)
        if aspect < constants.motion_min_aspect:
            return None, (
                "motion not estimated: the contacts span as much across as along the depth "
                f"({aspect:.1f} x), as on an MEA, so there is no insertion axis to drift along "
                '(motion="rigid" or "nonrigid" estimates it anyway)'
            )
    span = float(np.ptp(depths))
    windows = int((span - constants.motion_window_um) // constants.motion_window_step_um)
    if mode == "rigid":
        return True, ""
    if windows >= constants.motion_min_windows:
        return False, ""
    if mode == "nonrigid":
        return True, (
            f"non-rigid motion needs {constants.motion_min_windows} depth windows of "
            f"{constants.motion_window_um:g} µm, {constants.motion_window_step_um:g} µm apart; "
            f"the probe spans {span:g} µm: rigid motion instead"
        )
    return True, ""


def estimate(
    recording,
    peaks: np.ndarray,
    depths: np.ndarray,
    rigid: bool,
    constants,
    device: str = "cpu",
    **dredge,
):
    """SpikeInterface Motion of ``recording`` from spikes at ``peaks`` (PEAK_DTYPE: sample,
    segment and amplitude) with posterior ``depths`` (µm). Segments are laid end to end so that
    all share one reference depth. ``dredge``: other arguments for ``dredge_ap``."""
    offsets = segment_offsets(recording)
    total = int(offsets[-1] + recording.get_num_samples(recording.get_num_segments() - 1))
    times = peaks["sample_index"] + offsets[peaks["segment_index"]]
    bins, displacement, spatial = _dredge(
        recording,
        times,
        total,
        depths,
        np.abs(peaks["amplitude"]),
        rigid,
        constants,
        device,
        **dredge,
    )
    fs = recording.get_sampling_frequency()
    displacements, temporal = [], []
    for segment in range(recording.get_num_segments()):
        start = offsets[segment] / fs
        duration = recording.get_num_samples(segment) / fs
        inside = (bins >= start) & (bins < start + duration)
        if not inside.any():
            inside = np.argmin(np.abs(bins - start - duration / 2)) == np.arange(len(bins))
        displacements.append(displacement[inside])
        temporal.append(bins[inside] - start + _segment_start(recording, segment))
    return _motion(displacements, temporal, spatial)


def screen(recording, peaks: np.ndarray, depths, chunk_size: int, constants, device):
    """The largest rigid displacement (µm, after removing the median) on spikes from a few
    chunks spread over the recording (a training sample), their chunks laid side by side:
    whether the full estimate is worth a pass over the recording. None when the spikes come
    from fewer than ``motion_screen_min_chunks`` chunks (too short a recording to drift)."""
    offsets = segment_offsets(recording)
    times = peaks["sample_index"] + offsets[peaks["segment_index"]]
    chunk = times // chunk_size
    kept, rank = np.unique(chunk, return_inverse=True)
    if len(kept) < constants.motion_screen_min_chunks:
        return None
    compact = rank * chunk_size + times % chunk_size
    _, displacement, _ = _dredge(
        recording,
        compact,
        len(kept) * chunk_size,
        depths,
        np.abs(peaks["amplitude"]),
        True,
        constants,
        device,
    )
    return float(np.max(np.abs(displacement - np.median(displacement))))


def too_few_spikes(recording, peaks: np.ndarray, constants) -> str:
    """Why the spikes are too few to estimate motion from ("" when they are enough)."""
    fs = recording.get_sampling_frequency()
    offsets = segment_offsets(recording)
    times = (peaks["sample_index"] + offsets[peaks["segment_index"]]) / fs
    duration = (offsets[-1] + recording.get_num_samples(recording.get_num_segments() - 1)) / fs
    bins = max(1, int(np.ceil(duration / constants.motion_bin_s)))
    counts = np.bincount((times // constants.motion_bin_s).astype(int), minlength=bins)
    typical = float(np.median(counts))
    if typical >= constants.motion_min_spikes_per_bin:
        return ""
    return (
        f"motion not estimated: a typical {constants.motion_bin_s:g} s time bin holds "
        f"{typical:g} spikes, and at least {constants.motion_min_spikes_per_bin} are needed"
    )


def summary(motion) -> tuple[float, float]:
    """(largest, RMS) µm displacement of ``motion`` after removing its median."""
    values = np.concatenate([d.ravel() for d in motion.displacement])
    values = values - np.median(values)
    return float(np.max(np.abs(values))), float(np.sqrt(np.mean(values**2)))


def load(path, recording):
    """A SpikeInterface motion folder (``Motion.save``) checked against ``recording``."""
    from spikeinterface.core.motion import Motion

    path = Path(path)
    if not (path / "spatial_bins_um.npy").exists():
        raise UsageError(f"{path} is not a SpikeInterface motion folder (Motion.save)")
    try:
        motion = Motion.load(path)
    except Exception as exc:
        raise UsageError(f"{path}: cannot read the motion folder ({exc})") from exc
    if motion.direction != "y":
        raise UsageError(f"{path}: motion along {motion.direction}; locsort corrects along y")
    segments = recording.get_num_segments()
    if motion.num_segments != segments:
        raise UsageError(
            f"{path} holds motion for {motion.num_segments} segment(s); the recording has "
            f"{segments}"
        )
    for segment in range(segments):
        bins = np.asarray(motion.temporal_bins_s[segment])
        start = _segment_start(recording, segment)
        duration = recording.get_num_samples(segment) / recording.get_sampling_frequency()
        step = float(np.median(np.diff(bins))) if len(bins) > 1 else duration
        if abs(bins[0] - start) > step or abs(bins[-1] - start - duration) > 2 * step:
            raise UsageError(
                f"{path}: segment {segment}'s motion covers {bins[0]:.1f}-{bins[-1]:.1f} s; "
                f"the recording's runs {start:.1f}-{start + duration:.1f} s"
            )
    return motion


def registered_recording(recording, motion, constants):
    """``recording`` with its traces interpolated to the registered frame (lazy), every channel
    kept (edges extrapolated from the nearest contacts, as spykingcircus2 does)."""
    from spikeinterface.sortingcomponents.motion import interpolate_motion

    return interpolate_motion(
        recording,
        motion,
        border_mode="force_extrapolate",
        spatial_interpolation_method="kriging",
        sigma_um=constants.motion_kriging_sigma_um,
        p=2,
    )


def recorded_depths(spikes: np.ndarray, motion, recording) -> np.ndarray:
    """(n,) µm each spike's depth on the probe as recorded, from its registered depth ``y``."""
    depths = spikes["y"].astype(np.float64)
    out = depths.copy()
    fs = recording.get_sampling_frequency()
    for segment in range(recording.get_num_segments()):
        rows = np.flatnonzero(spikes["segment_index"] == segment)
        if not len(rows):
            continue
        times = spikes["sample_index"][rows] / fs + _segment_start(recording, segment)
        ok = np.isfinite(depths[rows])
        shift = np.zeros(len(rows))
        shift[ok] = motion.get_displacement_at_time_and_depth(
            times[ok], depths[rows][ok], segment_index=segment
        )
        out[rows] = depths[rows] + shift
    return out.astype(np.float32)


def _dredge(recording, times, total, depths, weights, rigid, constants, device, **dredge):
    """(bin centres s, (T, W) displacement µm, (W,) window centres µm) from spikes at global
    sample ``times`` on a timeline of ``total`` samples, weighted by ``weights``."""
    from spikeinterface.generation import NoiseGeneratorRecording
    from spikeinterface.sortingcomponents.motion import estimate_motion

    ok = np.isfinite(depths) & np.isfinite(weights) & (weights > 0)
    if ok.sum() < 2:
        raise LocsortError("too few located spikes to estimate motion from")
    fs = recording.get_sampling_frequency()
    timeline = NoiseGeneratorRecording(
        num_channels=recording.get_num_channels(),
        sampling_frequency=fs,
        durations=[total / fs],
        strategy="on_the_fly",
    )
    timeline.set_dummy_probe_from_locations(recording.get_channel_locations())
    peaks = np.zeros(int(ok.sum()), [("sample_index", "int64"), ("amplitude", "float64")])
    peaks["sample_index"] = times[ok]
    peaks["amplitude"] = weights[ok]
    locations = np.zeros(len(peaks), [("y", "float64")])
    locations["y"] = depths[ok]
    motion = estimate_motion(
        timeline,
        peaks,
        locations,
        direction="y",
        rigid=rigid,
        method="dredge_ap",
        win_shape="gaussian",
        win_step_um=constants.motion_window_step_um,
        win_scale_um=constants.motion_window_um,
        **{
            "bin_s": constants.motion_bin_s,
            "histogram_time_smooth_s": constants.motion_time_smooth_s,
            "max_disp_um": constants.motion_max_um,
            "device": device,
            "progress_bar": False,
            **dredge,
        },
    )
    return (
        np.asarray(motion.temporal_bins_s[0]),
        np.asarray(motion.displacement[0]),
        np.asarray(motion.spatial_bins_um),
    )


def _motion(displacements, temporal, spatial):
    from spikeinterface.core.motion import Motion

    # the reference is the median position, as SpikeInterface's motion benchmark scores it
    middle = np.median(np.concatenate([d.ravel() for d in displacements]))
    return Motion([d - middle for d in displacements], temporal, spatial, direction="y")


def _segment_start(recording, segment: int) -> float:
    return float(recording.sample_index_to_time(0, segment_index=segment))


def with_registered(prep, motion, timer):
    """``prep`` with its recording registered by ``motion`` and everything measured on the
    traces (noise, neighbourhood noise correlations, detection filter) measured again."""
    from .prepare import measured

    recording = registered_recording(prep.recording, motion, prep.params.constants)
    return replace(measured(recording, prep.params, timer, prep.bad_channels), registered=True)
