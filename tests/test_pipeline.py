"""The public API on a 10-second generated recording: detection, localization at given
peaks, sorting, bad channels, and the atomic output folder."""

import numpy as np
import pytest

import locsort
from locsort.errors import LocsortError, UsageError
from locsort.evaluate import ground_truth_peaks, localization_errors, match_spikes
from locsort.io import atomic_folder
from locsort.models import Models
from locsort.output import save_sorting
from locsort.params import Params, params_with
from locsort.pipeline import fit_models
from locsort.prepare import prepare
from locsort.sample import observed_again, training_sample


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
    other = locsort.detect(recording, params=params_with(chunk_duration=0.37), progress=False)
    np.testing.assert_array_equal(other["sample_index"], detected["sample_index"])
    np.testing.assert_array_equal(other["channel_index"], detected["channel_index"])


def test_peak_detection_agrees_with_spikeinterface(ground_truth_recording):
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    from locsort.preprocess import noise_levels, preprocess

    recording, _ = ground_truth_recording
    detected = locsort.detect(
        recording, params=params_with(detect_method="peak", detect_threshold=5), progress=False
    )
    processed = preprocess(recording)
    theirs = detect_peaks(
        processed,
        method="locally_exclusive",
        method_kwargs=dict(
            detect_threshold=5,
            peak_sign="neg",
            exclude_sweep_ms=0.3,
            radius_um=40,
            noise_levels=noise_levels(processed),
        ),
        job_kwargs=dict(n_jobs=1, progress_bar=False, chunk_duration="1s"),
    )
    # same threshold, sweep and radius; SpikeInterface ranks neighbouring peaks by SNR where we
    # rank them by µV (the centre channel is the largest deflection), so a few peaks move channel
    ours = set(zip(detected["sample_index"].tolist(), detected["channel_index"].tolist()))
    common = len(ours & set(zip(theirs["sample_index"].tolist(), theirs["channel_index"].tolist())))
    assert common / len(theirs) > 0.9 and common / len(ours) > 0.9
    assert abs(len(ours) - len(theirs)) < 0.05 * len(theirs)


def test_matched_filter_detection_finds_more_small_spikes_than_peaks():
    from locsort.simulate import generate_recording

    # noise at 25 µV puts many of the generator's units near the threshold
    recording, truth = generate_recording(duration=10.0, num_units=20, noise_level=25.0, seed=1)
    found, false = {}, {}
    for method in ("peak", "matched"):
        peaks = locsort.detect(recording, params=params_with(detect_method=method), progress=False)
        _, matched = match_spikes(locsort.spikes.spikes_from_peaks(peaks), recording, truth)
        found[method] = (matched >= 0).mean()
        false[method] = len(peaks) - len(np.unique(matched[matched >= 0]))
    # measured: 0.44 of the true spikes with peaks, 0.61 with the matched filter, 18 false
    # detections each
    assert found["matched"] > 1.2 * found["peak"]
    assert false["matched"] <= false["peak"] + 0.01 * len(matched)


def test_matched_filter_score_peaks_at_the_spike_trough():
    from locsort.detect import MatchedFilter

    rng = np.random.default_rng(0)
    prototype = -np.exp(-0.5 * ((np.arange(21) - 8) / 2.0) ** 2)
    prototype = (prototype / np.linalg.norm(prototype)).astype(np.float32)
    noise = np.array([2.0, 4.0], np.float32)
    traces = rng.normal(size=(500, 2)).astype(np.float32) * noise
    traces[:, 1] = 0.0
    # a noise-free spike, trough at sample 300 on channel 1
    traces[300 - 8 : 300 + 13, 1] = 40 * prototype
    score = MatchedFilter(prototype, 8, np.ones(2, np.float32)).score(traces, noise).numpy()
    assert score[:, 1].argmax() == 300
    # the score is the correlation of each channel (in noise units) with the prototype
    expected = np.correlate(traces[:, 0] / noise[0], prototype, mode="full")[
        len(prototype) - 1 - 8 :
    ][:500]
    np.testing.assert_allclose(score[:, 0], expected, atol=1e-4)


def test_noise_only_recording_falls_back_to_peak_detection():
    from spikeinterface.core import NumpyRecording

    traces = np.random.default_rng(0).normal(scale=10.0, size=(300_000, 4)).astype(np.float32)
    recording = NumpyRecording([traces], sampling_frequency=30_000.0)
    recording.set_dummy_probe_from_locations(np.array([[0, 0], [0, 20], [20, 0], [20, 20]], float))
    prep = prepare(recording, Params())
    assert prep.matched_filter is None and "too few large spikes" in prep.detection


def test_localize_honours_given_peaks_one_to_one_in_order(ground_truth_recording):
    recording, truth = ground_truth_recording
    peaks, true_xyz = ground_truth_peaks(recording, truth)
    shuffled = np.random.default_rng(0).permutation(len(peaks))
    spikes = locsort.localize(
        recording, peaks=peaks[shuffled], method="center_of_mass", progress=False
    )
    assert len(spikes) == len(peaks)
    np.testing.assert_array_equal(spikes["sample_index"], peaks["sample_index"][shuffled])
    np.testing.assert_array_equal(spikes["channel_index"], peaks["channel_index"][shuffled])
    in_order = locsort.localize(recording, peaks=peaks, method="center_of_mass", progress=False)
    # same spikes in another order: same locations up to float32 rounding (batches differ, so sums
    # do)
    np.testing.assert_allclose(spikes["x"], in_order["x"][shuffled], rtol=1e-5)
    errors = localization_errors(in_order, true_xyz)
    assert errors["median_xy_um"] < 25.0  # SpikeInterface's centre of mass: ~19.5 µm here


@pytest.mark.parametrize("cache_mb, cached_chunks", [(512.0, 10), (16.0, 2), (None, 0)])
def test_main_pass_takes_the_training_samples_chunks_from_the_trace_cache(
    ground_truth_recording, monkeypatch, cache_mb, cached_chunks
):
    import locsort.scan

    recording, _ = ground_truth_recording
    reads = []
    original = locsort.scan.read_chunk
    monkeypatch.setattr(
        locsort.scan, "read_chunk", lambda *args: reads.append(args[1]) or original(*args)
    )
    spikes = locsort.localize(
        recording, method="center_of_mass", params={"trace_cache_mb": cache_mb}, progress=False
    )
    # 10 chunks of 1 s, all in the training sample; 16 MB holds two of them (7.7 MB each)
    assert len(reads) == 10 + 10 - cached_chunks
    if cached_chunks:  # the same spikes and locations as when every chunk is read again
        monkeypatch.setattr(locsort.scan, "read_chunk", original)
        again = locsort.localize(
            recording, method="center_of_mass", params={"trace_cache_mb": None}, progress=False
        )
        np.testing.assert_array_equal(spikes["sample_index"], again["sample_index"])
        np.testing.assert_array_equal(spikes["x"], again["x"])


def test_a_sorts_training_sample_reads_only_the_chunks_its_spike_budget_needs(
    ground_truth_recording, monkeypatch
):
    import locsort.scan
    from locsort.localize.baseline import CenterOfMass

    recording, _ = ground_truth_recording
    reads = []
    original = locsort.scan.read_chunk
    monkeypatch.setattr(
        locsort.scan, "read_chunk", lambda *args: reads.append(args[1]) or original(*args)
    )

    def sample(per_channel: int):
        reads.clear()
        params = params_with(
            chunk_duration=0.25,
            sample_chunks=30,
            sample_spikes_per_channel=per_channel,
            trace_cache_mb=None,
        )
        prep = prepare(recording, params)
        drawn = training_sample(
            prep, CenterOfMass(9), None, progress=False, windows=True, keep_neighbourhood=True
        )
        return drawn, sorted(chunk.start for chunk in reads)

    everything, all_read = sample(
        0
    )  # 30 of the 40 quarter-second chunks, spread over the recording
    assert (
        len(all_read) == 30
        and all_read[0] == 0
        and all_read[-1] == recording.get_num_samples() - 7500
    )
    per_chunk = len(everything.peaks) / 30
    half = int(
        np.ceil(15 * per_chunk / recording.get_num_channels())
    )  # a budget of about 15 chunks' spikes
    budgeted, some_read = sample(half)
    assert 10 < len(some_read) < 30 and len(set(some_read)) == len(some_read)
    assert (
        some_read[0] == 0 and some_read[-1] > 0.8 * recording.get_num_samples()
    )  # still spread over the recording
    assert len(budgeted.peaks) < len(everything.peaks) and len(budgeted.windows) == len(
        budgeted.peaks
    )
    assert np.all(
        np.diff(budgeted.peaks["sample_index"]) >= 0
    )  # in time order, as one round would give
    # a budget the recording's spikes cannot meet reads every chunk, as without one
    assert sample(10 * half)[1] == all_read


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


def test_sorting_folder_is_written_without_spikeinterfaces_provenance_warning(tmp_path):
    """The output's sorting/ folder loads back with every spike, and saving it does not print
    SpikeInterface's "not serializable, provenance not saved" warning at the user."""
    import warnings

    from spikeinterface.core import NumpySorting, load

    sorting = NumpySorting.from_samples_and_labels(
        [np.array([5, 40, 90])], [np.array([0, 1, 0])], 30000.0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_sorting(sorting, tmp_path / "sorting")
    assert not [w for w in caught if "provenance" in str(w.message)]
    loaded = load(tmp_path / "sorting")
    np.testing.assert_array_equal(loaded.get_unit_spike_train(0), [5, 90])
    np.testing.assert_array_equal(loaded.get_unit_spike_train(1), [40])


@pytest.fixture(scope="module")
def damaged_recording(ground_truth_recording):
    """The generated recording with two channels flat (zeros: broken contacts) and one with 60 µV of
    extra noise, as real probes have."""
    from locsort.simulate import with_bad_channels

    recording, _ = ground_truth_recording
    return with_bad_channels(recording, flat=[5, 30], noisy=[17], extra_noise_uv=60.0)


def test_flat_and_noisy_channels_are_found_and_interpolated(
    ground_truth_recording, damaged_recording
):

    recording, _ = ground_truth_recording
    ids = list(recording.channel_ids)
    assert prepare(recording).bad_channels == {}
    prep = prepare(damaged_recording)
    assert set(prep.bad_channels) == {ids[5], ids[17], ids[30]}
    assert prep.bad_channels[ids[5]].startswith("flat") and prep.bad_channels[ids[17]].startswith(
        "noisy"
    )
    # interpolated from their neighbours: neither zeros nor 60 µV of noise (an average of neighbours
    # is a little quieter than one channel)
    assert np.all(
        (prep.noise > 0.3 * np.median(prep.noise)) & (prep.noise < 1.5 * np.median(prep.noise))
    )
    # and detection sees what it sees on the intact recording; kept as they are, the damaged
    # channels add false spikes
    clean = len(locsort.detect(recording, progress=False))
    assert abs(len(locsort.detect(damaged_recording, progress=False)) - clean) < 0.03 * clean
    assert (
        len(
            locsort.detect(damaged_recording, params=params_with(bad_channels=None), progress=False)
        )
        > 1.05 * clean
    )


def test_bad_channels_can_be_named_or_kept_and_unknown_names_or_hopeless_recordings_are_refused(
    damaged_recording,
):
    from locsort.simulate import with_bad_channels

    ids = list(damaged_recording.channel_ids)
    named = prepare(
        damaged_recording, params_with(bad_channels=f"{ids[5]}, {ids[30]}")
    ).bad_channels
    assert set(named) == {ids[5], ids[30]}
    assert prepare(damaged_recording, params_with(bad_channels=None)).bad_channels == {}
    with pytest.raises(UsageError, match="channels the recording does not have: nope"):
        prepare(damaged_recording, params_with(bad_channels="nope"))
    with pytest.raises(LocsortError, match="too few good ones"):
        prepare(damaged_recording, params_with(bad_channels=",".join(map(str, ids[:40]))))
    with pytest.raises(LocsortError, match="every channel is flat"):
        prepare(with_bad_channels(damaged_recording, flat=range(len(ids))))


def test_a_run_names_its_interpolated_channels_in_run_json_and_the_report(
    tmp_path, damaged_recording
):
    import json

    ids = [str(c) for c in damaged_recording.channel_ids]
    result = locsort.run(damaged_recording, out=tmp_path / "out", progress=False)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    recorded = info["bad_channels"]
    assert set(recorded) == {ids[5], ids[17], ids[30]} and recorded[ids[17]].startswith("noisy")
    # the sort reports locations read with the amplitude denoiser, by its clustering's encoder
    # refined on them
    assert (
        "spatio-temporal" in info["amplitudes"]
        and info["localization"]["training"]["refined_from"]["epochs"] >= 1
    )
    assert "channels interpolated from their neighbours" in result.note
    assert (
        "channels interpolated from their neighbours"
        in (tmp_path / "out" / "report.html").read_text()
    )


def test_localizing_fits_the_amplitude_denoiser_and_saved_models_read_amplitudes_with_it(
    ground_truth_recording, tmp_path
):
    from locsort.localize.baseline import CenterOfMass

    recording, _ = ground_truth_recording
    params = params_with(sample_chunks=4)
    prep = prepare(recording, params)
    assert prep.amplitudes.components is None and prep.denoise  # localizing: on
    models = fit_models(prep, None, progress=False, localizer=CenterOfMass(9))
    reader = models.amplitudes
    assert (
        reader.components is not None
        and np.all(reader.gains >= 0.3)
        and "spatio-temporal" in reader.description
    )
    assert prep.amplitudes.components is None  # what prepare made stays as it was
    # the sample's amplitudes read again from its kept snippets, as the main pass reads them
    sample = training_sample(prep, CenterOfMass(9), None, progress=False, keep_neighbourhood=True)
    reread = observed_again(prep, CenterOfMass(9), sample, reader)
    again = training_sample(prep, CenterOfMass(9), None, progress=False, amplitudes=reader)
    np.testing.assert_allclose(
        again.observations["amplitudes"], reread.observations["amplitudes"], rtol=1e-3, atol=1e-3
    )
    # a resumed run reads amplitudes as its models were trained on
    Models(CenterOfMass(9), amplitudes=reader).save(tmp_path)
    loaded = Models.load(tmp_path, prepare(recording, params))
    np.testing.assert_array_equal(loaded.amplitudes.components, reader.components)
    off = prepare(recording, params_with(sample_chunks=4, amplitude_denoise_min_gain=1.0))
    assert not off.denoise
    assert fit_models(off, None, False, localizer=CenterOfMass(9)).amplitudes.components is None
