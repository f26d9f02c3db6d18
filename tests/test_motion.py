"""Drift: motion estimated from locsort's own spikes, the recording registered with it, and what
a run says and writes about it. The end-to-end checks use a generated 64-channel, 60 s
recording with a ±20 µm zigzag (the same spikes as a still one)."""

import json

import numpy as np
import probeinterface as pi
import pytest
import spikeinterface.comparison as sc
from spikeinterface.core import NumpyRecording, load
from spikeinterface.core.motion import Motion

import locsort
from locsort import motion as motion_stage
from locsort.cli import main
from locsort.constants import Constants
from locsort.params import params_with
from locsort.pipeline import register, registered_with_saved, sort_spikes
from locsort.prepare import prepare
from locsort.simulate import generate_drifting, neuropixels_like_probe
from locsort.sort.postprocess import merge_motion_pieces
from locsort.spikes import PEAK_DTYPE
from locsort.workarea import WorkArea

C = Constants()


@pytest.fixture(scope="module")
def drifting():
    return generate_drifting("zigzag", duration=60.0, num_units=30, num_channels=64, seed=3)


@pytest.fixture(scope="module")
def corrected(drifting, tmp_path_factory):
    out = tmp_path_factory.mktemp("motion") / "out"
    return locsort.run(drifting.drifting, out, progress=False)


def _accuracy(sorting, truth) -> float:
    comparison = sc.compare_sorter_to_ground_truth(truth, sorting, exhaustive_gt=True)
    return float(comparison.get_performance()["accuracy"].mean())


def _motion_error(motion, drifting) -> np.ndarray:
    """|estimate - truth| µm on the estimate's bins after the drift starts, both without their
    median (SpikeInterface's motion benchmark)."""
    bins = np.asarray(motion.temporal_bins_s[0])
    estimate = motion.displacement[0]
    truth = drifting.true_motion(bins, motion.spatial_bins_um)
    error = (estimate - np.median(estimate)) - (truth - np.median(truth))
    return np.abs(error[bins >= 10.0])


def test_drift_is_recovered_and_corrected_sorting_beats_uncorrected(drifting, corrected):
    out = corrected.out
    motion = Motion.load(out / "motion")  # loads in SpikeInterface
    error = _motion_error(motion, drifting)
    assert np.sqrt(np.mean(error**2)) < 3.0 and np.percentile(error, 95) < 5.0

    info = json.loads((out / "run.json").read_text())["motion"]
    assert info["applied"] and info["mode"] == "auto" and info["rigid"] is True
    assert 15.0 < info["max_um"] < 25.0 and 5.0 < info["rms_um"] < 15.0
    assert (out / "figures" / "drift.png").stat().st_size > 10_000
    assert "drift.png" in (out / "report.html").read_text()

    uncorrected = locsort.sort(drifting.drifting, {"motion": None}, progress=False)
    with_motion = _accuracy(corrected.sorting, drifting.truth.sorting)
    without = _accuracy(uncorrected, drifting.truth.sorting)
    assert with_motion > without + 0.1, (with_motion, without)


def test_spikes_carry_recorded_and_registered_depths(drifting, corrected):
    spikes = np.load(corrected.out / "spikes.npy")
    motion = Motion.load(corrected.out / "motion")
    times = spikes["sample_index"] / drifting.drifting.get_sampling_frequency()
    shift = motion.get_displacement_at_time_and_depth(times, spikes["y_registered"])
    assert np.allclose(spikes["y"], spikes["y_registered"] + shift, atol=1e-3, equal_nan=True)
    # a unit's spikes keep still in the registered frame, and move with the probe as recorded
    spread_recorded, spread_registered = [], []
    for unit in np.unique(spikes["unit_index"][spikes["unit_index"] >= 0]):
        mine = spikes[spikes["unit_index"] == unit]
        if len(mine) >= 50:
            spread_recorded.append(np.nanstd(mine["y"]))
            spread_registered.append(np.nanstd(mine["y_registered"]))
    assert np.median(spread_registered) < 0.6 * np.median(spread_recorded)


def test_a_saved_motion_folder_is_reused(drifting, corrected):
    prep = prepare(drifting.drifting, params_with(motion=str(corrected.out / "motion")))
    registered, motion, info = registered_with_saved(prep)
    assert motion == Motion.load(corrected.out / "motion")
    assert info.applied and info.method.startswith("loaded from")
    assert type(registered.recording).__name__ == "InterpolateMotionRecording"
    # a neuron's size on one channel moves with the probe: the merges know the traces were moved
    assert registered.registered and not prep.registered


def test_pieces_of_one_neuron_split_by_the_displacement_merge_and_neighbours_do_not():
    rng = np.random.default_rng(0)
    n = 400
    displacement = np.tile(np.repeat([0.0, 15.0], 50), n // 100 * 3)  # a drift between two levels
    pieces = {
        # one neuron whose spikes fell in two units, one per displacement level
        0: (0.0, 100.0, displacement == 0.0),
        1: (2.0, 104.0, displacement == 15.0),
        # two neurons at one place firing throughout: never merged
        2: (30.0, 300.0, np.ones(len(displacement), bool)),
        3: (33.0, 303.0, np.ones(len(displacement), bool)),
        # a unit far from unit 0 whose spikes come only while displaced: a different neuron
        4: (0.0, 600.0, displacement == 15.0),
    }
    units = np.full(len(displacement), -1)
    x, y = np.zeros(len(displacement)), np.zeros(len(displacement))
    for unit, (ux, uy, allowed) in pieces.items():
        rows = rng.choice(np.flatnonzero(allowed & (units < 0)), size=n // 4, replace=False)
        units[rows], x[rows], y[rows] = unit, ux + rng.normal(0, 2, len(rows)), uy
    args = (units, x, y, displacement, C.motion_merge_max_um)
    merged = merge_motion_pieces(*args, C.motion_merge_max_overlap, C.cluster_min_size)
    assert set(merged[units == 1]) == {0} and set(merged[units == 0]) == {0}
    for unit in (2, 3, 4):
        assert set(merged[units == unit]) == {unit}
    assert np.array_equal(merged[units < 0], units[units < 0])
    assert np.array_equal(merge_motion_pieces(*args, 0.0, C.cluster_min_size), units)


def test_without_drift_auto_changes_nothing(ground_truth_recording):
    recording, _ = ground_truth_recording
    auto, auto_models, _ = sort_spikes(prepare(recording, params_with()), progress=False)
    off, _, _ = sort_spikes(prepare(recording, params_with(motion=None)), progress=False)
    assert not auto_models.motion_info.applied
    assert "no drift found" in auto_models.motion_info.note
    for name in off.dtype.names:
        assert np.array_equal(auto[name], off[name], equal_nan=True), name
    assert np.array_equal(auto["y"], auto["y_registered"], equal_nan=True)


@pytest.fixture(scope="module")
def short_drift(tmp_path_factory):
    """A 20 s recording with jumps, saved: a file Dask workers can read."""
    drift = generate_drifting(
        "jumps", duration=20.0, num_units=15, num_channels=64, seed=4, amplitude_um=10.0
    )
    folder = tmp_path_factory.mktemp("short_drift") / "rec"
    drift.drifting.save(folder=folder, progress_bar=False)
    return load(folder)


def test_resumed_and_dask_runs_register_identically(short_drift, tmp_path):
    params = params_with(motion="rigid", chunk_duration=0.5)
    prep = prepare(short_drift, params)
    reference, models, _ = sort_spikes(prep, progress=False)
    assert models.motion is not None

    identity = {"test": "motion"}
    with WorkArea(tmp_path / "out", identity, 40, overwrite=False) as work:
        first, _, _ = sort_spikes(prepare(short_drift, params), False, work=work)
        for chunk in (work.path / "chunks").glob("*.npz"):  # interrupted after training
            chunk.unlink()
    with WorkArea(tmp_path / "out", identity, 40, overwrite=False) as work:
        assert work.has_models()
        resumed, _, _ = sort_spikes(prepare(short_drift, params), False, work=work)
    sorting = locsort.sort(short_drift, params, progress=False, workers=2)
    for spikes in (first, resumed):
        for name in reference.dtype.names:
            assert np.array_equal(spikes[name], reference[name], equal_nan=True), name
    expected = locsort.output.sorting_from_spikes(reference, short_drift)
    for unit in expected.unit_ids:
        train = sorting.get_unit_spike_train(unit)
        assert np.array_equal(train, expected.get_unit_spike_train(unit))


# ------------------------------------------------------------------ estimation on known spikes


def _spike_cloud(durations, displacement, seed=0, depths=None):
    """Peaks and depths of units at ``depths`` (default: 20 at random) firing 10 Hz each in
    every segment, their depth moved by ``displacement(t)`` (t in s from the first segment's
    start), 2 µm of jitter."""
    rng = np.random.default_rng(seed)
    depths = rng.uniform(20.0, 600.0, 20) if depths is None else depths
    fs, peaks, ys, start = 30_000.0, [], [], 0.0
    for segment, duration in enumerate(durations):
        n = int(10 * duration * len(depths))
        t = np.sort(rng.uniform(0, duration, n))
        unit = rng.integers(0, len(depths), n)
        part = np.zeros(n, PEAK_DTYPE)
        part["sample_index"] = (t * fs).astype(np.int64)
        part["segment_index"] = segment
        part["amplitude"] = -100.0 - 50.0 * (unit % 3)
        peaks.append(part)
        ys.append(depths[unit] + displacement(t + start) + rng.normal(0, 2.0, n))
        start += duration
    return np.concatenate(peaks), np.concatenate(ys)


def _recording(durations, probe=None, noise: bool = False):
    """A recording of ``durations`` on ``probe``, silent or (``noise``) with 5 µV noise."""
    probe = probe if probe is not None else neuropixels_like_probe(64)
    shapes = [(int(d * 30_000), probe.get_contact_count()) for d in durations]
    rng = np.random.default_rng(0)
    traces = [
        rng.normal(0, 5, shape).astype(np.float32) if noise else np.zeros(shape, np.float32)
        for shape in shapes
    ]
    recording = NumpyRecording(traces, 30_000.0)
    recording.set_probe(probe)
    return recording


def test_motion_of_a_multi_segment_recording_shares_one_reference():
    durations = [40.0, 30.0]
    recording = _recording(durations)
    true = lambda t: 15.0 * np.sin(2 * np.pi * t / 35.0)  # noqa: E731
    peaks, depths = _spike_cloud(durations, true)
    motion = motion_stage.estimate(recording, peaks, depths, True, C)
    assert motion.num_segments == 2
    errors = []
    for segment, offset in enumerate((0.0, 40.0)):
        bins = np.asarray(motion.temporal_bins_s[segment])
        assert bins.min() >= 0 and bins.max() <= durations[segment]
        errors.append(motion.displacement[segment][:, 0] - true(bins + offset))
    errors = np.concatenate(errors)  # one reference: one offset for both segments
    assert np.sqrt(np.mean((errors - np.median(errors)) ** 2)) < 2.0


def test_too_few_spikes_per_time_bin_skips_motion():
    recording = _recording([60.0])
    still = lambda t: 0 * t  # noqa: E731
    one_unit, _ = _spike_cloud([60.0], still, depths=np.array([100.0]))  # 10 spikes per second
    note = motion_stage.too_few_spikes(recording, one_unit[::2], C)
    assert "holds 5 spikes" in note and f"at least {C.motion_min_spikes_per_bin}" in note
    twenty_units, _ = _spike_cloud([60.0], still)
    assert motion_stage.too_few_spikes(recording, twenty_units, C) == ""


# ------------------------------------------------------------------------------- probe shapes


def _probe(positions, shank_ids=None):
    probe = pi.Probe(ndim=2)
    probe.set_contacts(positions=np.asarray(positions, float), shank_ids=shank_ids)
    probe.set_device_channel_indices(np.arange(len(positions)))
    return probe


def test_a_probe_without_rows_along_its_depth_skips_motion():
    for positions in ([[0.0, 0.0]], [[20.0 * i, 0.0] for i in range(8)]):
        recording = _recording([1.0], _probe(positions))
        rigid, note = motion_stage.plan(recording, "auto", C)
        assert rigid is None and "row(s) of contacts" in note
    # through the stage itself: nothing is estimated, and run.json's note says why
    recording = _recording([1.0], _probe([[20.0 * i, 0.0] for i in range(8)]), noise=True)
    prep = prepare(recording, params_with(motion="rigid"))
    same, motion, info = register(prep, None, progress=False)
    assert same is prep and motion is None and "row(s) of contacts" in info.note


def test_auto_does_not_estimate_motion_on_an_mea():
    """A square MEA has no insertion axis: on a still recording the estimate was spurious (up
    to 50 µm) and registering by it cost the sort most of its accuracy."""
    from locsort.simulate import square_mea_probe

    mea = _recording([1.0], square_mea_probe(10, 15.0))
    rigid, note = motion_stage.plan(mea, "auto", C)
    assert rigid is None and "MEA" in note
    assert motion_stage.plan(mea, "rigid", C) == (True, "")  # asked for: estimated
    # a four-shank probe is as wide as it is tall, each of its shanks is not
    shanks = pi.generate_multi_shank(num_shank=4, num_columns=2, num_contact_per_column=16)
    ids = np.repeat(["0", "1", "2", "3"], 32)
    assert motion_stage.plan(_recording([1.0], _probe(shanks.contact_positions, ids)), "auto", C)[0]


def test_a_short_probe_falls_back_to_rigid_motion_and_says_so():
    recording = _recording([1.0])  # 64 channels, 620 µm: fewer than two windows
    rigid, note = motion_stage.plan(recording, "nonrigid", C)
    assert rigid is True and "rigid motion instead" in note
    assert motion_stage.plan(recording, "auto", C) == (True, "")
    assert motion_stage.plan(_recording([1.0], neuropixels_like_probe(128)), "auto", C)[0]
    long_probe = _recording([1.0], neuropixels_like_probe(192))
    assert motion_stage.plan(long_probe, "auto", C) == (False, "")


def test_shanks_share_one_motion():
    one = neuropixels_like_probe(64)
    positions = np.concatenate([one.contact_positions, one.contact_positions + [250.0, 0.0]])
    recording = _recording([40.0], _probe(positions, shank_ids=np.repeat(["0", "1"], 64)))
    assert motion_stage.plan(recording, "auto", C) == (True, "")
    true = lambda t: 10.0 * np.sign(t - 20.0)  # noqa: E731
    peaks, depths = _spike_cloud([40.0], true)
    motion = motion_stage.estimate(recording, peaks, depths, True, C)
    jump = np.median(motion.displacement[0][25:, 0]) - np.median(motion.displacement[0][:15, 0])
    assert abs(jump - 20.0) < 2.0


# ------------------------------------------------------------------------------- bad folders


def _run_cli(args, capsys):
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def test_a_motion_folder_that_does_not_fit_the_recording_is_refused(
    corrected, ground_truth_recording, tmp_path, capsys
):
    recording, _ = ground_truth_recording  # 10 s: the saved motion covers 60 s
    folder = tmp_path / "rec"
    recording.save(folder=folder, progress_bar=False)
    cases = {
        "covers": corrected.out / "motion",
        "not a SpikeInterface motion folder": tmp_path,
    }
    two = tmp_path / "two_segments"
    saved = Motion.load(corrected.out / "motion")
    Motion(saved.displacement * 2, saved.temporal_bins_s * 2, saved.spatial_bins_um).save(two)
    cases["2 segment(s)"] = two
    for words, motion_folder in cases.items():
        out = tmp_path / "out"
        code, lines = _run_cli(
            ["run", str(folder), "--out", str(out), "--quiet", "--motion", str(motion_folder)],
            capsys,
        )
        assert code == 2 and len(lines) == 1 and words in lines[0], lines
        assert not out.exists()
