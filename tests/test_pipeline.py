"""The public API on a 10-second generated recording: detection, localization at given
peaks, sorting, and the atomic output folder."""

import numpy as np
import pytest

import locsort
from locsort.errors import UsageError
from locsort.evaluate import ground_truth_peaks, localization_errors, match_spikes
from locsort.io import atomic_folder
from locsort.params import Params


@pytest.fixture(scope="module")
def detected(ground_truth_recording):
    recording, _ = ground_truth_recording
    return locsort.detect(recording, progress=False)


def test_detection_finds_the_true_spikes(ground_truth_recording, detected):
    recording, truth = ground_truth_recording
    spikes = locsort.spikes.spikes_from_peaks(detected)
    units, matched = match_spikes(spikes, recording, truth)
    # the generator's units are mostly well above noise: nearly all their spikes are found
    assert (matched >= 0).mean() > 0.85
    assert detected["amplitude"].max() < 0  # negative peaks
    assert np.all(np.diff(detected["sample_index"]) >= 0)


def test_detection_does_not_depend_on_chunk_boundaries(ground_truth_recording, detected):
    recording, _ = ground_truth_recording
    other = locsort.detect(recording, params=Params(chunk_duration=0.37), progress=False)
    np.testing.assert_array_equal(other["sample_index"], detected["sample_index"])
    np.testing.assert_array_equal(other["channel_index"], detected["channel_index"])


def test_detection_agrees_with_spikeinterface(ground_truth_recording, detected):
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    from locsort.preprocess import noise_levels, preprocess

    recording, _ = ground_truth_recording
    processed = preprocess(recording)
    theirs = detect_peaks(
        processed, method="locally_exclusive",
        method_kwargs=dict(detect_threshold=5, peak_sign="neg", exclude_sweep_ms=0.3, radius_um=40,
                           noise_levels=noise_levels(processed)),
        job_kwargs=dict(n_jobs=1, progress_bar=False, chunk_duration="1s"),
    )
    # same threshold, sweep and radius; SpikeInterface ranks neighbouring peaks by SNR where we
    # rank them by µV (the centre channel is the largest deflection), so a few peaks move channel
    ours = set(zip(detected["sample_index"].tolist(), detected["channel_index"].tolist()))
    common = len(ours & set(zip(theirs["sample_index"].tolist(), theirs["channel_index"].tolist())))
    assert common / len(theirs) > 0.9 and common / len(ours) > 0.9
    assert abs(len(ours) - len(theirs)) < 0.05 * len(theirs)


def test_localize_honours_given_peaks_one_to_one_in_order(ground_truth_recording):
    recording, truth = ground_truth_recording
    peaks, true_xyz = ground_truth_peaks(recording, truth)
    shuffled = np.random.default_rng(0).permutation(len(peaks))
    spikes = locsort.localize(recording, peaks=peaks[shuffled], method="center_of_mass", progress=False)
    assert len(spikes) == len(peaks)
    np.testing.assert_array_equal(spikes["sample_index"], peaks["sample_index"][shuffled])
    np.testing.assert_array_equal(spikes["channel_index"], peaks["channel_index"][shuffled])
    in_order = locsort.localize(recording, peaks=peaks, method="center_of_mass", progress=False)
    np.testing.assert_allclose(spikes["x"], in_order["x"][shuffled])
    errors = localization_errors(in_order, true_xyz)
    assert errors["median_xy_um"] < 25.0  # SpikeInterface's centre of mass: ~19.5 µm here


def test_localize_rejects_peaks_on_missing_channels(ground_truth_recording):
    recording, truth = ground_truth_recording
    peaks, _ = ground_truth_peaks(recording, truth)
    peaks = peaks[:10].copy()
    peaks["channel_index"][3] = 64
    with pytest.raises(UsageError, match="channel_index 64"):
        locsort.localize(recording, peaks=peaks, progress=False)


def test_sort_returns_units_that_match_the_ground_truth(ground_truth_recording):
    from locsort.evaluate import sorting_accuracy

    recording, truth = ground_truth_recording
    sorting = locsort.sort(recording, progress=False)
    assert sorting.get_sampling_frequency() == recording.get_sampling_frequency()
    result = sorting_accuracy(sorting, truth)
    assert result["num_units"] > 5
    assert result["well_detected"] >= 5


def test_atomic_folder_leaves_nothing_when_interrupted(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "spikes.npy").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            raise RuntimeError("killed")
    assert (out / "old.txt").exists()
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").exists() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
