"""Ground-truth recordings: SpikeInterface's generator on a locally built probe, and MEArec files.

Probes are built here from their geometry, never downloaded (``probeinterface.get_probe``
fetches from the internet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class GroundTruth:
    """The true spike trains and the true source position of each unit.

    ``unit_locations[i]`` is (x, y, z) in µm, SpikeInterface frame, for ``sorting.unit_ids[i]``.
    """

    sorting: object
    unit_locations: np.ndarray


def neuropixels_like_probe(num_channels: int = 64):
    """A Neuropixels-1.0-like probe: 4 columns 16 µm apart, 40 µm row pitch, alternate columns
    shifted by 20 µm, 12 µm square contacts, wired in contact order."""
    import probeinterface as pi

    if num_channels % 4:
        raise ValueError("a Neuropixels-like probe needs a multiple of 4 channels")
    probe = pi.generate_multi_columns_probe(
        num_columns=4,
        num_contact_per_column=num_channels // 4,
        xpitch=16,
        ypitch=40,
        y_shift_per_column=[0, 20, 0, 20],
        contact_shapes="square",
        contact_shape_params={"width": 12},
    )
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def neuropixels2_like_probe(num_channels: int = 64, num_shanks: int = 1):
    """A Neuropixels-2.0-like probe: per shank 2 aligned columns 32 µm apart, 15 µm row pitch,
    12 µm square contacts; ``num_shanks`` shanks 250 µm apart, ``num_channels`` spread evenly
    over them; wired in contact order."""
    import probeinterface as pi

    if num_channels % (2 * num_shanks):
        raise ValueError(
            "a Neuropixels-2.0-like probe needs an even number of channels on each shank"
        )
    probe = pi.generate_multi_shank(
        num_shank=num_shanks,
        shank_pitch=[250, 0],
        num_columns=2,
        num_contact_per_column=num_channels // num_shanks // 2,
        xpitch=32,
        ypitch=15,
        contact_shapes="square",
        contact_shape_params={"width": 12},
    )
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def linear_probe(num_channels: int = 32, pitch_um: float = 25.0):
    """A single-column silicon probe (Cambridge NeuroTech / NeuroNexus linear layouts):
    ``num_channels`` contacts ``pitch_um`` apart, 7.5 µm radius, wired in contact order."""
    import probeinterface as pi

    probe = pi.generate_linear_probe(
        num_elec=num_channels,
        ypitch=pitch_um,
        contact_shapes="circle",
        contact_shape_params={"radius": 7.5},
    )
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def polytrode_probe(num_channels: int = 64, pitch_um: float = 25.0):
    """A two-column polytrode (NeuroNexus Poly2-like): columns ``pitch_um`` apart, contacts
    ``pitch_um`` apart along each, the second column shifted by half a pitch, 7.5 µm radius,
    wired in contact order."""
    if num_channels % 2:
        raise ValueError("a two-column polytrode needs an even number of channels")
    return columns_probe(num_channels, 2, pitch_um, pitch_um)


def columns_probe(num_channels: int, num_columns: int, pitch_um: float, column_pitch_um: float):
    """A multi-column silicon probe: ``num_columns`` columns ``column_pitch_um`` apart, contacts
    ``pitch_um`` apart along each, every other column shifted by half a pitch, filled column by
    column (the last may be short), 7.5 µm radius, wired in contact order."""
    import probeinterface as pi

    per_column = -(-num_channels // num_columns)
    probe = pi.generate_multi_columns_probe(
        num_columns=num_columns,
        num_contact_per_column=per_column,
        xpitch=column_pitch_um,
        ypitch=pitch_um,
        y_shift_per_column=[pitch_um / 2 * (c % 2) for c in range(num_columns)],
        contact_shapes="circle",
        contact_shape_params={"radius": 7.5},
    )
    if per_column * num_columns > num_channels:
        probe = probe.get_slice(np.arange(num_channels))
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def square_mea_probe(rows: int = 10, pitch_um: float = 15.0):
    """A square multi-electrode array: ``rows`` x ``rows`` contacts ``pitch_um`` apart (the
    localization paper's 10 x 10, 15 µm MEA), 5 µm radius contacts, wired in contact order."""
    import probeinterface as pi

    probe = pi.generate_multi_columns_probe(
        num_columns=rows,
        num_contact_per_column=rows,
        xpitch=pitch_um,
        ypitch=pitch_um,
        contact_shapes="circle",
        contact_shape_params={"radius": 5},
    )
    probe.set_device_channel_indices(np.arange(rows * rows))
    return probe


def generate_recording(
    duration: float = 60.0,
    num_units: int = 50,
    noise_level: float = 5.0,
    seed: int = 0,
    num_channels: int = 64,
    sampling_frequency: float = 30_000.0,
    probe=None,
):
    """A seeded ground-truth recording (SpikeInterface's generator) and its GroundTruth.

    Defaults: 64-channel Neuropixels-like probe, 50 units, noise 5 µV. On a multi-shank probe
    the units are spread evenly over the shanks.
    """
    from spikeinterface.core import generate_ground_truth_recording

    probe = probe if probe is not None else neuropixels_like_probe(num_channels)
    shanks = _shanks(probe)
    templates = locations = None
    if len(np.unique(shanks)) > 1:
        templates, locations = _templates_by_shank(
            probe, shanks, num_units, sampling_frequency, seed
        )
    recording, sorting = generate_ground_truth_recording(
        durations=[float(duration)],
        sampling_frequency=sampling_frequency,
        probe=probe,
        num_units=num_units,
        templates=templates,
        seed=seed,
        noise_kwargs={"noise_levels": float(noise_level), "strategy": "on_the_fly"},
    )
    if locations is None:
        locations = sorting.get_property("gt_unit_locations")
    else:
        sorting.set_property("gt_unit_locations", locations)
    return recording, GroundTruth(sorting=sorting, unit_locations=np.asarray(locations, float))


def _shanks(probe) -> np.ndarray:
    ids = probe.shank_ids
    if ids is None or len(ids) == 0 or np.all(np.asarray(ids) == ""):
        return np.zeros(probe.get_contact_count(), int)
    return np.unique(np.asarray(ids).astype(str), return_inverse=True)[1]


def _templates_by_shank(probe, shanks, num_units, sampling_frequency, seed):
    """(templates, unit locations) with the units spread evenly over the shanks, each placed
    around its own shank as SpikeInterface's generator places them around a probe (its box
    around the whole probe would put most units in the gaps between shanks, out of reach of
    every contact)."""
    from spikeinterface.core.generate import generate_templates, generate_unit_locations

    positions = probe.contact_positions
    per_shank = np.array_split(np.arange(num_units), len(np.unique(shanks)))
    locations = np.concatenate(
        [
            generate_unit_locations(
                len(units),
                positions[shanks == shank],
                seed=seed + shank,
                margin_um=10.0,
                minimum_z=5.0,
                maximum_z=50.0,
                minimum_distance=20,
            )
            for shank, units in enumerate(per_shank)
        ]
    )
    templates = generate_templates(
        positions, locations, sampling_frequency, 1.0, 3.0, seed=seed, dtype="float32"
    )
    return templates, locations


def with_bad_channels(recording, flat=(), noisy=(), extra_noise_uv: float = 60.0, seed: int = 0):
    """An in-memory copy of ``recording`` in µV with the channels at indices ``flat`` zeroed
    (broken contacts) and those at ``noisy`` given ``extra_noise_uv`` of extra white noise, as
    real probes have."""
    from spikeinterface.core import NumpyRecording

    traces = recording.get_traces(return_in_uV=recording.has_scaleable_traces()).astype(np.float32)
    traces[:, list(flat)] = 0.0
    rng = np.random.default_rng(seed)
    for channel in noisy:
        traces[:, channel] += rng.normal(0.0, extra_noise_uv, len(traces)).astype(np.float32)
    copy = NumpyRecording(
        [traces], recording.get_sampling_frequency(), channel_ids=recording.channel_ids
    )
    copy.set_probe(recording.get_probe())
    return copy


def read_mearec_ground_truth(path: str | Path):
    """A MEArec .h5 file as (recording, GroundTruth) with soma positions in SpikeInterface's frame.

    MEArec stores ``template_locations`` as (x, y, z) with x the distance from the probe
    plane; in SpikeInterface's frame the same point is (y, z, |x|).
    """
    import h5py
    import spikeinterface.extractors as se

    recording, sorting = se.read_mearec(str(path))
    with h5py.File(path, "r") as f:
        if "template_locations" not in f:
            raise ValueError(f"{path} has no template_locations: not a MEArec recording")
        mearec_xyz = np.asarray(f["template_locations"][()], dtype=float)
    if mearec_xyz.ndim == 3:
        # drifting recordings store one position per drift step; MEArec's drift indices count
        # from the middle step, the position with no displacement
        mearec_xyz = mearec_xyz[:, mearec_xyz.shape[1] // 2, :]
    locations = np.column_stack([mearec_xyz[:, 1], mearec_xyz[:, 2], np.abs(mearec_xyz[:, 0])])
    # unit "#i" is spike train i, in the order of template_locations
    order = [int(str(u).lstrip("#")) for u in sorting.unit_ids]
    return recording, GroundTruth(sorting=sorting, unit_locations=locations[order])


DRIFT_SCENARIOS = ("zigzag", "nonrigid", "jumps", "random_walk")


@dataclass
class Drifting:
    """The same spikes recorded with and without drift (SpikeInterface's
    ``generate_drifting_recording``), and the truth about both.

    static, drifting : the two recordings
    truth : the spike trains and each unit's position at the start (no displacement)
    unit_displacements : (T, U) µm each unit's displacement along the depth (y) at ``times``
    times : (T,) s
    """

    static: object
    drifting: object
    truth: GroundTruth
    unit_displacements: np.ndarray
    times: np.ndarray

    def true_motion(self, temporal_bins: np.ndarray, spatial_bins: np.ndarray) -> np.ndarray:
        """(len(temporal_bins), len(spatial_bins)) µm: the units' displacement at those times
        (interpolated), at each depth the displacement of the unit nearest in depth (a Motion's
        bins)."""
        depth = self.truth.unit_locations[:, 1]
        nearest = np.argmin(np.abs(depth[None, :] - np.asarray(spatial_bins)[:, None]), axis=1)
        return np.stack(
            [np.interp(temporal_bins, self.times, self.unit_displacements[:, u]) for u in nearest],
            axis=1,
        )


def generate_drifting(
    scenario: str = "zigzag",
    duration: float = 300.0,
    num_units: int = 100,
    num_channels: int = 128,
    seed: int = 0,
    amplitude_um: float = 20.0,
) -> Drifting:
    """A static and a drifting recording of the same spikes on a Neuropixels-like probe built
    here (nothing is downloaded). ``scenario``: "zigzag" (rigid, ±``amplitude_um``, a 200 s
    period or shorter on short recordings), "nonrigid" (the zigzag, twice as large at the bottom
    of the probe as at its top), "jumps" (steps of up to 2 x ``amplitude_um`` every 30 to
    90 s, shorter on short recordings) or "random_walk". The drift starts at
    a sixth of the recording (the benchmark scores the motion from there)."""
    from spikeinterface.generation import generate_drifting_recording

    if scenario not in DRIFT_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: use {', '.join(DRIFT_SCENARIOS)}")
    start = duration / 6
    motion = {"drift_mode": "zigzag", "t_start_drift": start, "period_s": min(200.0, duration / 2)}
    if scenario == "nonrigid":
        motion["non_rigid_gradient"] = 0.5
    elif scenario == "jumps":
        low = min(30.0, duration / 8)
        motion = {"drift_mode": "bump", "t_start_drift": start, "bump_interval_s": (low, 3 * low)}
    elif scenario == "random_walk":
        motion = {"drift_mode": "random_walk", "t_start_drift": start}
    static, drifting, sorting, extra = generate_drifting_recording(
        num_units=num_units,
        duration=float(duration),
        probe=neuropixels_like_probe(num_channels),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0,
            drift_start_um=[0, amplitude_um],
            drift_stop_um=[0, -amplitude_um],
            drift_step_um=1,
            motion_list=[motion],
        ),
        extra_outputs=True,
        seed=seed,
    )
    locations = np.asarray(extra["unit_locations"], dtype=float)
    displacements = np.asarray(extra["unit_displacements"])[:, :, 1]
    times = np.arange(len(displacements)) / extra["displacement_sampling_frequency"]
    return Drifting(static, drifting, GroundTruth(sorting, locations), displacements, times)
