"""Sorting: the neural sorter (labels, training, post-processing, pretrained backbone,
save/load) and the SpikeInterface sorter plug-in, on the 10-second generated recording."""

import numpy as np
import pytest
import torch

import locsort
from locsort.errors import LocsortError, UsageError
from locsort.evaluate import detected_localization_errors, sorting_accuracy
from locsort.localize import make_localizer
from locsort.neighbourhood import Neighbourhood
from locsort.output import sorting_from_spikes
from locsort.params import Params, params_with
from locsort.pipeline import fit_models, sort_spikes
from locsort.prepare import prepare
from locsort.sample import chunks_before, training_sample
from locsort.sort.labels import labels_from_sorting, match
from locsort.sort.neural import (
    NUM_TIME_POINTS,
    Backbone,
    Ensemble,
    NeuralSorter,
    SpikeNet,
    Windows,
    backbone_info,
    load_backbone,
)
from locsort.sort.postprocess import assign_units, drop_border_duplicates
from locsort.sort.training import self_trained, with_network_units
from locsort.sort.pretrained import BACKBONE_PATH

FAST = dict(neural_epochs=8, encoder_max_epochs=10)


def test_assign_units_keeps_one_unit_per_candidate_and_local_maxima_in_time():
    samples = np.array([100, 103, 100, 400, 600, 900, 905])
    proba = torch.tensor(
        [
            [0.9, 0.1],  # unit 0 ...
            [0.7, 0.0],  # ... seen again 3 samples later: not a second spike
            [
                0.2,
                0.6,
            ],  # unit 1 at the same time as unit 0's spike: a spike of its own (other candidate)
            [0.2, 0.25],  # nobody's spike (0.45 in all): rejected
            [
                0.3,
                0.4,
            ],  # split between two similar units, a spike all the same (0.7): the more probable one
            [0.6, 0.8],  # one candidate claimed by both: the more probable unit only
            [0.55, 0.0],  # unit 0 five samples after a unit-1 spike: kept
        ]
    )
    units, scores = assign_units(samples, proba, threshold=0.5, refractory=10)
    np.testing.assert_array_equal(units, [0, -1, 1, -1, 1, 1, 0])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6, 0.25, 0.4, 0.8, 0.55], rtol=1e-6)


def test_assign_units_handles_long_sparse_segments_in_pieces():
    samples = np.array([0, 5, 10_000_000, 10_000_004])
    proba = torch.tensor([[0.9], [0.8], [0.6], [0.7]])
    units, _ = assign_units(samples, proba, threshold=0.5, refractory=10)
    np.testing.assert_array_equal(units, [0, -1, -1, 0])


def test_border_duplicates_are_dropped_per_unit_and_segment():
    segment = np.array([0, 0, 0, 1, 0])
    samples = np.array([100, 104, 300, 102, 104])
    units = np.array([0, 0, 0, 0, 1])
    out = drop_border_duplicates(segment, samples, units, refractory=10)
    np.testing.assert_array_equal(out, [0, -1, 0, 0, 1])


def _sorting(times_per_unit, fs=30000.0):
    from spikeinterface.core import NumpySorting

    samples = np.concatenate(times_per_unit)
    labels = np.concatenate([np.full(len(t), i) for i, t in enumerate(times_per_unit)])
    order = np.argsort(samples, kind="stable")
    return NumpySorting.from_samples_and_labels(
        [samples[order]], [labels[order]], fs, unit_ids=np.arange(len(times_per_unit))
    )


def test_first_k_labels_make_later_candidates_unknown_not_negative(ground_truth_recording):
    recording, _ = ground_truth_recording
    sorting = _sorting(
        [np.array([1000, 2000, 3000, 4000]), np.array([1500, 50_000]), np.array([], dtype=np.int64)]
    )
    labels = labels_from_sorting(sorting, recording, max_spikes_per_unit=3)
    assert labels.num_units == 2 and any("no spikes" in n for n in labels.notes)
    assert any("fewer than K = 3" in n for n in labels.notes)
    assert labels.known_until[0] == 3000  # unit 0: complete up to its 3rd spike
    assert labels.known_until[1] == recording.get_num_samples(
        0
    )  # unit 1: all its spikes are labelled
    candidates = np.array([1002, 1499, 2500, 3001, 3990, 50_003])
    targets, mask = match(labels, candidates, tolerance=12)
    np.testing.assert_array_equal(targets[:, 0], [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(targets[:, 1], [0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(mask[:, 0], [True, True, True, True, False, False])
    assert mask[:, 1].all()


def test_labels_from_another_recording_are_refused(ground_truth_recording):
    recording, _ = ground_truth_recording
    with pytest.raises(UsageError, match="sampling frequency"):
        labels_from_sorting(_sorting([np.array([10, 20])], fs=25000.0), recording)
    with pytest.raises(UsageError, match="outside the recording"):
        labels_from_sorting(_sorting([np.array([10, recording.get_num_samples(0) + 5])]), recording)
    with pytest.raises(UsageError, match="no unit with spikes"):
        labels_from_sorting(_sorting([np.array([], dtype=np.int64)]), recording)


@pytest.fixture(scope="module")
def trained_on_truth(ground_truth_recording):
    recording, truth = ground_truth_recording
    prep = prepare(recording, params_with(**FAST))
    spikes, result, _ = sort_spikes(prep, progress=False, labels=truth.sorting)
    return spikes, result, sorting_from_spikes(spikes, prep.recording)


def test_neural_sorter_trained_on_ground_truth_recovers_the_units(
    ground_truth_recording, trained_on_truth
):
    _, truth = ground_truth_recording
    spikes, result, sorting = trained_on_truth
    assert (
        result.neural is not None and result.neural.pretrained and result.label_source == "labels"
    )
    score = sorting_accuracy(sorting, truth)
    assert score["num_units"] <= 20  # at most one output unit per labelled unit
    assert score["well_detected"] >= 14, score
    assert score["mean_accuracy"] > 0.7, score
    # spikes no unit claims are kept (localized) with unit -1
    assert (spikes["unit_index"] == -1).any() and np.isfinite(spikes["x"]).all()


def test_trained_neural_sorter_saves_and_loads_to_the_same_outputs(
    tmp_path, ground_truth_recording, trained_on_truth
):
    _, result, _ = trained_on_truth
    recording, _ = ground_truth_recording
    constants = Params().constants
    neighbourhood = Neighbourhood.from_recording(
        recording, constants.neighbourhood_channels, constants.shank_gap_um
    )
    rng = np.random.default_rng(0)
    windows = Windows(
        rng.normal(size=(50, NUM_TIME_POINTS, 25)).astype(np.float16),
        neighbourhood.real[:50],
        neighbourhood.offsets[:50],
        neighbourhood.positions[:50].astype(np.float32),
    )
    result.neural.save(tmp_path / "net.safetensors")
    loaded = NeuralSorter.load(tmp_path / "net.safetensors")
    torch.testing.assert_close(loaded.predict_proba(windows), result.neural.predict_proba(windows))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(LocsortError, match="corrupt"):
        NeuralSorter.load(tmp_path / "bad.safetensors")
    with pytest.raises(UsageError, match="not found"):
        NeuralSorter.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file(
        {"w": torch.zeros(1)},
        str(tmp_path / "old.safetensors"),
        metadata={
            "format": "locsort-neural-sorter",
            "version": "1",
            "kind": "sorter",
            "num_time_points": str(NUM_TIME_POINTS),
        },
    )
    with pytest.raises(LocsortError, match="another locsort"):
        NeuralSorter.load(tmp_path / "old.safetensors")


def _grid_neighbourhood() -> Neighbourhood:
    """Neighbourhoods of a 5 x 5 grid of 20 µm (the corners' have virtual slots)."""
    return Neighbourhood(
        np.stack(np.meshgrid(np.arange(5) * 20.0, np.arange(5) * 20.0), -1).reshape(-1, 2)
    )


def _noise_windows(n: int, seed: int) -> Windows:
    """``n`` windows of white noise on random centres of the 5 x 5 grid."""
    hood = _grid_neighbourhood()
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, len(hood.positions), n)
    return Windows(
        rng.normal(size=(n, NUM_TIME_POINTS, hood.size)).astype(np.float16),
        hood.real[centre],
        hood.offsets[centre],
        hood.positions[centre].astype(np.float32),
    )


def test_an_ensemble_averages_its_members_probabilities():
    inputs = NeuralSorter()._tensors(_noise_windows(30, seed=1))
    torch.manual_seed(0)
    members = [SpikeNet(4).eval(), SpikeNet(4).eval()]
    with torch.no_grad():
        expected = (torch.sigmoid(members[0](*inputs)) + torch.sigmoid(members[1](*inputs))) / 2
        torch.testing.assert_close(
            torch.sigmoid(Ensemble(members)(*inputs)), expected, atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(expected, torch.sigmoid(members[0](*inputs)))  # the members differ


def test_an_ensemble_saves_and_loads_to_the_same_outputs(tmp_path):
    windows = _noise_windows(200, seed=2)
    targets = np.eye(3, dtype=np.float32)[np.random.default_rng(2).integers(0, 3, 200)]
    sorter = NeuralSorter(epochs=2, ensemble=2).fit(windows, targets)
    assert (
        isinstance(sorter.net, Ensemble) and len(sorter.net.members) == 2 and sorter.num_units == 3
    )
    sorter.save(tmp_path / "ensemble.safetensors")
    loaded = NeuralSorter.load(tmp_path / "ensemble.safetensors")
    torch.testing.assert_close(loaded.predict_proba(windows), sorter.predict_proba(windows))


def test_synthetic_positives_are_a_units_mean_snippet_plus_another_labelled_spikes_noise():
    from locsort.sort.neural import _with_synthetic_positives

    hood = _grid_neighbourhood()
    corner, middle = 0, 12
    assert not hood.real[corner].all() and hood.real[middle].all()
    rng = np.random.default_rng(3)
    template = np.sin(np.linspace(0, 3, NUM_TIME_POINTS))[:, None] * rng.normal(size=hood.size) * 8
    # unit 0: 8 spikes on the corner contact and a lone one on the middle contact; unit 1: 6 spikes
    # (the opposite sign) on the middle contact; then a negative and an unlabelled window
    centre = np.array([corner] * 8 + [middle] * 9)
    owner = np.array([0] * 9 + [1] * 6 + [-1, -1])
    sign = np.select([owner == 0, owner == 1], [1.0, -1.0], 0.0)
    waves = (
        rng.normal(size=(len(centre), NUM_TIME_POINTS, hood.size)) + sign[:, None, None] * template
    ) * hood.real[centre][:, None, :]
    windows = Windows(
        waves.astype(np.float16),
        hood.real[centre],
        hood.offsets[centre],
        hood.positions[centre].astype(np.float32),
    )
    targets = np.zeros((len(centre), 2), np.float32)
    targets[owner >= 0, owner[owner >= 0]] = 1
    mask = np.ones_like(targets)
    mask[-1] = 0
    new, tensors, y, m = _with_synthetic_positives(
        NeuralSorter()._tensors(windows),
        torch.as_tensor(targets),
        torch.as_tensor(mask),
        torch.arange(len(centre)),
        200,
        torch.Generator().manual_seed(0),
    )
    assert np.array_equal(
        new, np.arange(len(centre), len(centre) + 200 * 14)
    )  # the lone spike has no noise of its own to give
    for unit, rows, contact in ((0, np.arange(8), corner), (1, np.arange(9, 15), middle)):
        made = new[y[new, unit].numpy() == 1]
        assert (
            len(made) == 200 * len(rows) and (y[made, 1 - unit] == 0).all() and (m[made] == 1).all()
        )
        assert np.allclose(tensors[3][made].numpy(), hood.positions[contact])
        noise = tensors[0][made].numpy() - waves[rows].mean(
            0
        )  # around the unit's mean snippet on its contact
        real = hood.real[contact]
        assert (
            abs(noise[:, :, real].std() - 1.0) < 0.08
        )  # noise of the data's size on every contact, not shrunk by the mean
        assert not noise[:, :, ~real].any()  # virtual slots stay empty
    lone = _with_synthetic_positives(
        NeuralSorter()._tensors(windows),
        torch.as_tensor(targets),
        torch.as_tensor(mask),
        torch.arange(8, 10),
        200,
        torch.Generator(),
    )  # one spike per unit (K = 1): nothing to add
    assert len(lone[0]) == 0 and len(lone[1][0]) == len(centre)


def test_peeling_templates_from_few_labels_take_the_networks_other_spikes(ground_truth_recording):
    """With 5 labelled spikes per unit, the unlabelled spikes of the training stretch join the
    unit the trained network gives them (peeling templates average them too); labels stay."""
    recording, truth = ground_truth_recording
    params = params_with(**FAST, localization_method="center_of_mass")
    prep = prepare(recording, params)
    labels = labels_from_sorting(truth.sorting, prep.recording, max_spikes_per_unit=5)
    sample = training_sample(
        prep,
        make_localizer("center_of_mass", params),
        None,
        progress=False,
        windows=True,
        labels=labels,
    )
    labelled = np.where(
        (sample.targets * sample.mask).max(1) > 0, (sample.targets * sample.mask).argmax(1), -1
    )
    sorter = NeuralSorter(epochs=4).fit(
        sample.windows, sample.targets, sample.mask, backbone=load_backbone(BACKBONE_PATH)
    )
    units = with_network_units(prep, sample, sorter, labelled)
    assert np.array_equal(units[labelled >= 0], labelled[labelled >= 0])
    added = (labelled < 0) & (units >= 0)
    assert added.sum() >= 2 * (labelled >= 0).sum(), (added.sum(), (labelled >= 0).sum())
    # the added spikes are mostly the unit's own
    agree = _true_label(truth, labels, sample.peaks["sample_index"][added]) == units[added]
    assert agree.mean() > 0.8, agree.mean()


def _true_label(truth, labels, when: np.ndarray) -> np.ndarray:
    """The labels' unit index of the true spike nearest each time in ``when`` (one segment),
    -1 where none is within 5 samples."""
    vector = truth.sorting.to_spike_vector()
    times, true_unit = vector["sample_index"], vector["unit_index"]
    right = np.clip(np.searchsorted(times, when), 1, len(times) - 1)
    nearest = np.where(
        np.abs(times[right] - when) < np.abs(times[right - 1] - when), right, right - 1
    )
    true_label = np.array(
        [list(labels.unit_ids).index(uid) for uid in truth.sorting.unit_ids[true_unit[nearest]]]
    )
    return np.where(np.abs(times[nearest] - when) <= 5, true_label, -1)


def test_few_labels_self_training_learns_from_the_spikes_after_the_labelled_stretch(
    ground_truth_recording,
):
    """With 5 labelled spikes per unit, the network trained on them labels a sample of the whole
    recording and a second network trains on both: it is trained on the spikes after the
    labelled stretch, assigns them to their true units, and every unit gets a peeling template."""
    recording, truth = ground_truth_recording
    params = params_with(**FAST, localization_method="center_of_mass")
    prep = prepare(recording, params)
    labels = labels_from_sorting(truth.sorting, prep.recording, max_spikes_per_unit=5)
    localizer = make_localizer("center_of_mass", params)
    sample = training_sample(
        prep,
        localizer,
        None,
        progress=False,
        windows=True,
        labels=labels,
        chunks=chunks_before(prep, labels.end),
    )
    unlabelled = training_sample(prep, localizer, None, progress=False, windows=True)
    first = NeuralSorter(epochs=4).fit(
        sample.windows, sample.targets, sample.mask, backbone=load_backbone(BACKBONE_PATH)
    )
    second, templates = self_trained(prep, sample, unlabelled, first, labels.end)
    later = unlabelled.peaks["sample_index"] >= labels.end
    assert labels.end < 0.5 * recording.get_num_samples() and later.sum() > len(sample.peaks)
    assert second.history["train_windows"] >= 0.85 * (
        len(sample.peaks) + later.sum()
    )  # the labelled rows once, the later ones too
    assert templates.defined.all()
    when = unlabelled.peaks["sample_index"][later]
    assigned, _ = assign_units(
        when,
        second.predict_proba(unlabelled.windows.subset(np.flatnonzero(later))),
        params.constants.neural_threshold,
        prep.counts.refractory,
    )
    true_label = _true_label(truth, labels, when)
    spike = true_label >= 0
    assert (assigned[spike] >= 0).mean() > 0.8  # recall of the later true spikes
    assert (assigned[spike] == true_label[spike]).mean() > 0.8


def test_pretrained_backbone_is_shipped_documented_and_fits_any_geometry():
    info = backbone_info(BACKBONE_PATH)
    assert info["made_by"] == "scripts/pretrain_backbone.py" and info["labels"] == "ground truth"
    backbone = load_backbone(BACKBONE_PATH)
    # a 10 x 10 square MEA (another probe type than the pretraining's) and a 3-channel probe
    for positions in (
        np.stack(np.meshgrid(np.arange(10) * 15.0, np.arange(10) * 15.0), -1).reshape(-1, 2),
        np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0]]),
    ):
        hood = Neighbourhood(positions)
        n = len(positions)
        waves = torch.randn(n, NUM_TIME_POINTS, hood.size)
        out = backbone(waves, torch.as_tensor(hood.real), torch.as_tensor(hood.offsets))
        assert out.shape == (n, 128) and torch.isfinite(out).all()


def test_imprinted_head_sorts_held_out_spikes_from_ten_labels_per_unit(ground_truth_recording):
    """Before any training, a head imprinted from 10 labelled spikes per unit assigns the other
    labelled spikes to their units, and the pretrained backbone does it better than a random one."""
    recording, truth = ground_truth_recording
    params = params_with(**FAST, localization_method="center_of_mass")
    prep = prepare(recording, params)
    held_out_accuracy = _imprinted_head_accuracy(
        prep, labels_from_sorting(truth.sorting, prep.recording), shots=10
    )
    pretrained, random = (
        held_out_accuracy(load_backbone(BACKBONE_PATH)),
        held_out_accuracy(Backbone()),
    )
    assert pretrained > 0.9 and pretrained > random, (pretrained, random)


def _imprinted_head_accuracy(prep, labels, shots: int):
    """A function of a backbone: the fraction of a labelled training sample's spikes, past the
    first ``shots`` of each unit, that a head imprinted from those first ones (no training)
    gives to their own unit."""
    sample = training_sample(
        prep,
        make_localizer("center_of_mass", prep.params),
        None,
        progress=False,
        windows=True,
        labels=labels,
    )
    labelled = np.flatnonzero(sample.targets.any(1))
    unit = sample.targets[labelled].argmax(1)
    first = np.concatenate([labelled[unit == u][:shots] for u in range(sample.targets.shape[1])])
    held_out = np.setdiff1d(labelled, first)
    sorter = NeuralSorter()

    def accuracy(backbone):
        torch.manual_seed(0)
        net = SpikeNet(sample.targets.shape[1], backbone).eval()
        net.imprint(
            sorter._tensors(sample.windows.subset(first)),
            torch.as_tensor(sample.targets[first]),
            torch.ones(len(first), sample.targets.shape[1]),
        )
        with torch.no_grad():
            predicted = net(*sorter._tensors(sample.windows.subset(held_out))).argmax(1).numpy()
        return float(np.mean(predicted == sample.targets[held_out].argmax(1)))

    return accuracy


def _recorded_fits(monkeypatch) -> list:
    """(sorter, backbone it was given, units it learned) of every NeuralSorter.fit call from now
    on, in order; fit itself still runs."""
    fits, fit = [], NeuralSorter.fit

    def recorded_fit(self, windows, targets, mask=None, backbone=None, progress=False):
        fits.append((self, backbone, targets.shape[1]))
        return fit(self, windows, targets, mask, backbone=backbone, progress=progress)

    monkeypatch.setattr(NeuralSorter, "fit", recorded_fit)
    return fits


def test_few_label_networks_fine_tune_a_backbone_trained_on_the_recordings_own_clustering(
    ground_truth_recording, monkeypatch
):
    """With 20 labelled spikes per unit, a network is first trained on locsort's own clustering of
    the whole recording (from the shipped backbone, no labels); the few-label networks fine-tune
    its backbone, and the self-trained network after them starts from scratch."""
    recording, truth = ground_truth_recording
    params = params_with(
        **FAST,
        localization_method="center_of_mass",
        label_max_spikes_per_unit=20,
        neural_frozen_epochs=2,
    )
    prep = prepare(recording, params)
    labels = labels_from_sorting(truth.sorting, prep.recording, max_spikes_per_unit=20)
    fits = _recorded_fits(monkeypatch)
    models = fit_models(prep, None, progress=False, labels=labels, label_source="labels")
    (own, shipped, clusters), (few, adapted, units), (last, none, _) = fits
    shipped_state = load_backbone(BACKBONE_PATH).state_dict()
    assert all(torch.equal(shipped.state_dict()[k], v) for k, v in shipped_state.items())
    assert own.num_units == clusters >= 10 and units == labels.num_units
    assert adapted is own.net.backbone and any(
        not torch.equal(adapted.state_dict()[k], v) for k, v in shipped_state.items()
    )
    assert isinstance(few.net, Ensemble) and none is None and models.neural is last
    assert any(
        n.startswith("backbone adapted to this recording: trained on locsort's own clustering")
        for n in models.notes
    )


def test_few_label_networks_keep_the_configured_backbone_when_the_own_clustering_finds_no_units(
    ground_truth_recording, monkeypatch
):
    """No cluster can reach ``cluster_min_size``: the own-clustering network is not trained, the
    few-label networks fine-tune the shipped backbone instead, and the notes say why."""
    recording, truth = ground_truth_recording
    params = params_with(
        **FAST,
        localization_method="center_of_mass",
        label_max_spikes_per_unit=20,
        neural_frozen_epochs=2,
        cluster_min_size=10**9,
    )
    prep = prepare(recording, params)
    labels = labels_from_sorting(truth.sorting, prep.recording, max_spikes_per_unit=20)
    fits = _recorded_fits(monkeypatch)
    models = fit_models(prep, None, progress=False, labels=labels, label_source="labels")
    (_, shipped, _), (_, none, _) = fits
    assert none is None and models.neural.num_units == labels.num_units
    assert all(
        torch.equal(shipped.state_dict()[k], v)
        for k, v in load_backbone(BACKBONE_PATH).state_dict().items()
    )
    assert (
        "the backbone was not adapted to this recording (the clustering of the training sample "
        "found no units, so the neural sorter was not trained)"
    ) in models.notes


def test_pretrained_backbone_stays_frozen_while_the_new_head_learns():
    """Linear probing, then fine-tuning: during the first ``frozen_epochs`` the backbone keeps
    its pretrained weights; afterwards it adapts."""
    positions = np.stack(np.meshgrid(np.arange(6) * 20.0, np.arange(6) * 20.0), -1).reshape(-1, 2)
    hood = Neighbourhood(positions)
    rng = np.random.default_rng(0)
    n = 400
    centre = rng.integers(0, len(positions), n)
    windows = Windows(
        rng.normal(size=(n, NUM_TIME_POINTS, hood.size)).astype(np.float16),
        hood.real[centre],
        hood.offsets[centre],
        hood.positions[centre].astype(np.float32),
    )
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    pretrained = load_backbone(BACKBONE_PATH)

    def backbone_moved(frozen_epochs):
        sorter = NeuralSorter(epochs=3, patience=10, frozen_epochs=frozen_epochs).fit(
            windows, targets, backbone=pretrained
        )
        after = sorter.net.backbone.state_dict()
        return any(not torch.equal(after[k], v) for k, v in pretrained.state_dict().items())

    assert not backbone_moved(frozen_epochs=3)
    assert backbone_moved(frozen_epochs=1)


def test_default_sort_trains_on_its_own_clustering_and_reports_denoised_locations(
    ground_truth_recording,
):
    recording, truth = ground_truth_recording
    prep = prepare(recording, params_with(**FAST))
    spikes, result, _ = sort_spikes(prep, progress=False)
    assert result.label_source == "clustering" and result.neural is not None
    score = sorting_accuracy(sorting_from_spikes(spikes, prep.recording), truth)
    assert score["well_detected"] >= 10, score
    # the reported locations: the clustering's encoder refined on amplitudes read with the denoiser
    assert result.amplitudes.components is not None and prep.amplitudes.components is None
    assert (
        result.localizer.history["refined_from"]["epochs"] >= 1
        and result.localizer.history["epochs"] <= 3
    )
    # the units are those of a sort that reports the clustering's own locations: only the locations
    # change
    plain = prepare(recording, params_with(encoder_refine_epochs=0, **FAST))
    plain_spikes, plain_result, _ = sort_spikes(plain, progress=False)
    assert (
        plain_result.amplitudes.components is None
        and "refined_from" not in plain_result.localizer.history
    )
    np.testing.assert_array_equal(plain_spikes["sample_index"], spikes["sample_index"])
    np.testing.assert_array_equal(plain_spikes["unit_index"], spikes["unit_index"])
    # and they are no further from the true unit positions (how much closer: bench_sorting.py)
    refined = detected_localization_errors(spikes, prep.recording, truth)["median_xy_um"]
    unrefined = detected_localization_errors(plain_spikes, plain.recording, truth)["median_xy_um"]
    assert refined <= unrefined + 0.1, (refined, unrefined)


def test_too_few_labelled_spikes_is_a_clear_error(ground_truth_recording):
    recording, truth = ground_truth_recording
    with pytest.raises(LocsortError, match="labelled spikes to train the neural sorter"):
        locsort.sort(
            recording,
            params=params_with(label_max_spikes_per_unit=2, min_training_spikes=300, **FAST),
            labels=truth.sorting,
            progress=False,
        )


def test_run_sorter_plugin_sorts_on_the_default_path_and_describes_every_parameter(
    tmp_path, ground_truth_recording
):
    from spikeinterface.sorters import (
        get_default_sorter_params,
        get_sorter_params_description,
        run_sorter,
        sorter_dict,
    )

    from locsort.params import public_fields

    recording, truth = ground_truth_recording
    assert sorter_dict["locsort"].gpu_capability == "nvidia-optional"
    defaults = get_default_sorter_params("locsort")
    described = get_sorter_params_description("locsort")
    assert set(defaults) == set(described) == {f.name for f in public_fields()}
    for name, text in described.items():  # a help line and the allowed values of each
        assert len(text) > 30 and text.rstrip().endswith(")") and "..." not in text, (name, text)
    recording = recording.save(folder=tmp_path / "recording", progress_bar=False)  # serializable
    sorting = run_sorter(
        "locsort", recording, folder=tmp_path / "si", verbose=False, remove_existing_folder=True
    )
    assert sorting_accuracy(sorting, truth)["well_detected"] >= 15
    # the folder locsort run writes, posteriors and all; the units carry their location
    output = tmp_path / "si" / "sorter_output"
    for name in ("spikes.npy", "run.json", "report.html", "units.tsv", "analyzer", "sorting"):
        assert (output / name).exists(), name
    spikes = np.load(output / "spikes.npy")
    unit = sorting.unit_ids[0]
    location = sorting.get_property("location")[0]
    mine = spikes[spikes["unit_index"] == unit]
    assert location[0] == pytest.approx(np.median(mine["x"]), abs=1e-3)
    assert set(sorting.get_property("quality")) <= {"good", "mua", "noise"}


def test_merge_joins_the_pieces_of_one_unit_and_keeps_different_units_apart():
    from locsort.sort.merge import merge_similar_units
    from locsort.sort.neural import NUM_TIME_POINTS

    rng = np.random.default_rng(0)
    k = 9  # a 3 x 3 neighbourhood, 20 µm pitch, every spike centred on the same contact
    slot_xy = np.stack(np.meshgrid([-20.0, 0.0, 20.0], [-20.0, 0.0, 20.0]), -1).reshape(k, 2)
    t = np.linspace(0, 1, NUM_TIME_POINTS)
    shape_a, shape_b = -np.exp(-(((t - 0.3) / 0.05) ** 2)), -np.exp(-(((t - 0.3) / 0.12) ** 2))
    footprint_a, footprint_b = (
        np.exp(-np.linalg.norm(slot_xy, axis=1) / 15),
        np.exp(-np.linalg.norm(slot_xy - [20, 0], axis=1) / 15),
    )
    truth = np.repeat([0, 1], 200)
    waves = np.where(
        truth[:, None, None] == 0,
        8 * shape_a[None, :, None] * footprint_a,
        8 * shape_b[None, :, None] * footprint_b,
    )
    waves = waves + rng.normal(0, 1, waves.shape)
    windows = _windows_on_one_contact(waves)
    split = np.where(truth == 0, rng.integers(0, 2, 400), 2)  # unit A cut in two clusters, B whole
    split[:5] = -1  # noise stays noise
    labels, merges = merge_similar_units(split, windows, min_similarity=0.95)
    assert merges == 1
    assert len(np.unique(labels[5:])) == 2 and (labels[:5] == -1).all()
    assert len(np.unique(labels[5:200])) == 1 and labels[200] != labels[5]


def test_merge_keeps_apart_two_neurons_with_one_template_whose_spikes_break_a_refractory_period():
    from locsort.sort.merge import Refractory, merge_similar_units
    from locsort.sort.neural import NUM_TIME_POINTS

    rng = np.random.default_rng(3)
    fs, n = 30_000.0, 400
    t = np.linspace(0, 1, NUM_TIME_POINTS)
    slot_xy = np.stack(np.meshgrid([-20.0, 0.0, 20.0], [-20.0, 0.0, 20.0]), -1).reshape(9, 2)
    footprint = np.exp(-np.linalg.norm(slot_xy, axis=1) / 15)
    shapes = [-np.exp(-(((t - 0.3) / w) ** 2)) for w in (0.05, 0.06)]  # cosine above 0.95
    waves = np.concatenate([8 * np.repeat(s[None, :, None] * footprint, n, 0) for s in shapes])
    windows = _windows_on_one_contact(waves + rng.normal(0, 1, waves.shape))

    def train():  # 20 Hz, never two spikes within 2 ms
        return np.cumsum(rng.exponential(0.048, n) + 0.002) * fs

    times = np.concatenate([train(), train()]).astype(np.int64)
    duration = int(times.max()) + 1
    refractory = Refractory(times, fs, duration, period_ms=1.5)
    labels = np.concatenate([rng.integers(0, 2, n), np.full(n, 2)])  # neuron A in two pieces
    assert len(np.unique(merge_similar_units(labels, windows, 0.95)[0])) == 1
    merged, merges = merge_similar_units(labels, windows, 0.95, refractory=refractory)
    assert merges == 1  # A's pieces, which never fire within 2 ms of each other
    assert len(np.unique(merged[:n])) == 1 and len(np.unique(merged[n:])) == 1
    assert merged[0] != merged[n]


def _windows_on_one_contact(waves):
    """Windows of spikes all centred on one contact of a 3 x 3, 20 µm neighbourhood."""
    from locsort.sort.neural import Windows

    n, _, k = waves.shape
    slot_xy = np.stack(np.meshgrid([-20.0, 0.0, 20.0], [-20.0, 0.0, 20.0]), -1).reshape(k, 2)
    return Windows(
        waves.astype(np.float16),
        np.ones((n, k), bool),
        np.repeat(slot_xy[None], n, 0).astype(np.float32),
        np.zeros((n, 2), np.float32),
    )


def test_split_separates_two_neurons_at_one_place_and_merge_rejoins_a_single_neuron():
    from locsort.sort.merge import merge_similar_units
    from locsort.sort.neural import NUM_TIME_POINTS
    from locsort.sort.split import split_units

    rng = np.random.default_rng(1)
    t = np.linspace(0, 1, NUM_TIME_POINTS)
    slot_xy = np.stack(np.meshgrid([-20.0, 0.0, 20.0], [-20.0, 0.0, 20.0]), -1).reshape(9, 2)
    footprint = np.exp(
        -np.linalg.norm(slot_xy - [5, 5], axis=1) / 15
    )  # one location, as clustering sees them
    narrow, wide = (
        -np.exp(-(((t - 0.3) / 0.04) ** 2)),
        -np.exp(-(((t - 0.32) / 0.1) ** 2)) + 0.3 * np.exp(-(((t - 0.55) / 0.1) ** 2)),
    )
    truth = np.repeat([0, 1], 300)
    waves = (
        np.where(truth[:, None, None] == 0, 7 * narrow[None, :, None], 6 * wide[None, :, None])
        * footprint
    )
    waves = waves + rng.normal(0, 1, waves.shape)
    labels = np.zeros(600, np.int64)
    labels[:3] = -1
    split, splits = split_units(labels, _windows_on_one_contact(waves), min_size=25)
    assert splits >= 1 and (split[:3] == -1).all()
    # each neuron is (nearly) all in one unit of its own
    for neuron in (0, 1):
        values, counts = np.unique(split[3:][truth[3:] == neuron], return_counts=True)
        assert counts.max() >= 0.9 * counts.sum(), (neuron, values, counts)
    assert (
        np.bincount(split[3:][truth[3:] == 0]).argmax()
        != np.bincount(split[3:][truth[3:] == 1]).argmax()
    )

    # one neuron whose spikes vary in size: whatever the split does, merge brings it back to one
    # unit
    sizes = rng.uniform(5, 9, 600)
    single = sizes[:, None, None] * narrow[None, :, None] * footprint + rng.normal(
        0, 1, (600, NUM_TIME_POINTS, 9)
    )
    windows = _windows_on_one_contact(single)
    split, _ = split_units(np.zeros(600, np.int64), windows, min_size=25)
    merged, _ = merge_similar_units(split, windows, min_similarity=0.95)
    assert len(np.unique(merged)) == 1


def test_peeling_subtracts_an_assigned_spike_and_leaves_the_one_under_it():
    from locsort.sort.peel import Templates, place, subtract

    rng = np.random.default_rng(0)
    # unit 0 on channels 0, 1, 2 (slot 3 virtual)
    shape_a = rng.standard_normal((12, 3)).astype(np.float32) * 20
    shape_b = rng.standard_normal((12, 3)).astype(np.float32) * 10
    footprints = np.array([[0, 1, 2, -1], [1, 2, 3, -1]])
    templates = Templates(
        np.stack([np.pad(shape_a, ((0, 0), (0, 1))), np.pad(shape_b, ((0, 0), (0, 1)))]), footprints
    )
    traces = np.zeros((200, 4), np.float32)
    traces[75:87, 0:3] += (
        1.3 * shape_a
    )  # unit 0's spike, one sample later than its candidate (row 80, before = 6)
    traces[78:90, 1:4] += shape_b  # unit 1's spike under it, not assigned
    residual, changed = subtract(traces, np.array([80]), np.array([0]), templates, before=6)
    expected = np.zeros_like(traces)
    expected[78:90, 1:4] = shape_b
    # what remains is unit 1's spike, up to the least-squares scale's pick-up of it
    assert np.abs(residual - expected).max() < 0.2 * np.abs(shape_b).max()
    assert (
        changed[75:87, 0:3].all()
        and not changed[:, 3].any()
        and not changed[:75].any()
        and not changed[87:].any()
    )
    # two assigned spikes whose templates overlap are both removed where they add up
    both, changed = subtract(traces, np.array([80, 84]), np.array([0, 1]), templates, before=6)
    placed = place(traces, np.array([80, 84]), np.array([0, 1]), templates, before=6)
    expected = traces.copy()
    for i in range(2):
        expected[placed.times[i][:, None], placed.channels[i][placed.real[i]]] -= (
            placed.scale[i] * placed.shape[i][:, placed.real[i]]
        )
    np.testing.assert_allclose(both, expected, atol=1e-4)
    assert np.abs(both).max() < 0.02 * np.abs(traces).max()
    assert (
        changed.sum() == 36 + 36 - 18 and changed[75:90].sum() == changed.sum()
    )  # 12 x 3 each, 9 x 2 shared
    # a unit without a template (no channels) is left alone
    templates.channels[0] = -1
    untouched, nothing = subtract(traces, np.array([80]), np.array([0]), templates, before=6)
    np.testing.assert_array_equal(untouched, traces)
    assert not nothing.any()


def test_a_units_template_is_its_mean_snippet_on_the_footprint_of_its_usual_centre():
    from locsort.sort.peel import MIN_SPIKES, Templates

    rng = np.random.default_rng(4)
    footprints = np.array(
        [[0, 1, 2, -1], [0, 1, 2, 3], [1, 2, 3, -1], [2, 3, -1, -1]]
    )  # channel -> footprint
    snippets = rng.standard_normal((40, 10, 4)).astype(np.float32)
    centres = np.array([1] * 12 + [2] * 3 + [0] * 25)
    units = np.array([0] * 15 + [1] * (MIN_SPIKES - 1) + [2] * (25 - MIN_SPIKES + 1))
    templates = Templates.fit(snippets, centres, units, 4, footprints)
    np.testing.assert_array_equal(
        templates.channels[0], footprints[1]
    )  # centre 1 is unit 0's usual one
    np.testing.assert_allclose(
        templates.waveforms[0], snippets[:12].mean(axis=0), atol=1e-6
    )  # its other centre left out
    np.testing.assert_array_equal(
        templates.defined, [True, False, True, False]
    )  # too few spikes; no spikes


def test_a_spike_found_under_others_must_be_fitted_by_its_units_template():
    from locsort.sort.peel import Templates, unfitted

    rng = np.random.default_rng(1)
    shapes = rng.standard_normal((2, 12, 4)).astype(np.float32) * 20
    shapes[:, :, 3] = 0  # slot 3 virtual
    templates = Templates(shapes, np.array([[0, 1, 2, -1], [0, 1, 2, -1]]))
    residual = np.zeros((300, 4), np.float32)
    residual[74:86, 0:3] = (
        0.8 * shapes[0, :, :3]
    )  # a smaller spike of unit 0 under the subtracted ones
    residual[174:186, 0:3] = rng.standard_normal((12, 3)) * 5  # a leftover of imperfect subtraction
    rows, units = np.array([80, 180, 180, 250]), np.array([0, 0, 1, -1])
    kept = unfitted(residual, rows, units, templates, before=6, min_fit=0.3)
    np.testing.assert_array_equal(kept, [0, -1, -1, -1])
    templates.channels[1] = -1  # a unit without a template cannot be tested: kept
    np.testing.assert_array_equal(
        unfitted(residual, rows, units, templates, 6, 0.3), [0, -1, 1, -1]
    )


def test_a_rejected_candidate_goes_to_the_best_fitting_template_among_its_likely_units():
    from locsort.sort.peel import Templates, rescue

    rng = np.random.default_rng(5)
    shapes = (
        rng.standard_normal((3, 12, 3)).astype(np.float32) * 20
    )  # three units on channels 0, 1, 2
    templates = Templates(shapes, np.tile([0, 1, 2], (3, 1)))
    traces = rng.standard_normal((700, 3)).astype(np.float32)
    for row, unit in [(80, 1), (180, 1), (280, 0), (483, 2)]:
        traces[row - 6 : row + 6] += shapes[unit]
    rows = np.array([80, 180, 280, 380, 480, 483, 600])
    units = np.array([-1, 1, -1, -1, -1, -1, 0])  # 180 and 600 assigned by the network
    proba = np.full((7, 3), 0.02)
    proba[0] = [0.3, 0.3, 0.02]  # unit 1's spike, the network torn between units 0 and 1
    proba[2] = [0.02, 0.02, 0.02]  # unit 0's spike but no unit probable enough to be tried
    proba[3] = [0.4, 0.4, 0.4]  # noise: no template fits
    proba[4:6, 2] = 0.3  # one spike of unit 2, found twice (483 is the better fit)
    kept = rescue(
        traces, rows, proba, units, templates, before=6, min_probability=0.1, min_fit=0.5, span=20
    )
    np.testing.assert_array_equal(kept, [1, 1, -1, -1, -1, 2, 0])
    units[0] = -1
    units[1] = -1
    proba[1] = proba[0]
    units[6] = 1  # unit 1 already fires at 90: the candidate at 80 is its leftover
    rows[6] = 90
    np.testing.assert_array_equal(
        rescue(traces, rows, proba, units, templates, 6, 0.1, 0.5, 20)[:2], [-1, 1]
    )


def test_a_spike_found_under_others_cannot_repeat_its_own_unit_within_a_snippet():
    from locsort.sort.peel import unexplained

    found = np.array([100, 100, 300, 500])
    units = np.array([0, 1, 0, -1])
    kept = unexplained(
        found, units, first_samples=np.array([90, 310]), first_units=np.array([0, 1]), span=20
    )
    np.testing.assert_array_equal(kept, [-1, 1, 0, -1])  # unit 0 fired at 90: 100 is its leftover


def test_shifted_copies_of_one_template_on_different_centres_merge_and_other_units_do_not():
    from locsort.sort.merge import merge_shifted_units
    from locsort.sort.peel import Templates

    rng = np.random.default_rng(2)
    t = np.arange(40)
    # six channels in a row; neighbourhoods of 4 channels (slot 3 of the last centre is virtual)
    index = np.array(
        [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, -1], [4, 5, -1, -1], [5, -1, -1, -1]]
    )
    footprint = np.array([0.3, 1.0, 0.8, 0.4, 0.1, 0.0])  # one neuron near channel 1
    trough = lambda at, width: -np.exp(-(((t - at) / width) ** 2))  # noqa: E731
    neuron = trough(15, 2.0)[:, None] * footprint * 50
    late = np.roll(neuron, 6, axis=0)  # the same neuron, detected 6 samples later on channel 2
    other = (
        (trough(15, 6.0)[:, None] - 0.5 * trough(25, 4.0)[:, None]) * footprint * 50
    )  # another neuron, same place
    waveforms = np.zeros((4, 40, 4), np.float32)
    waveforms[0] = neuron[:, index[0]]
    waveforms[1] = late[:, index[1]]
    waveforms[2] = other[:, index[0]]
    waveforms[3] = (
        rng.standard_normal((40, 4)) * 20
    )  # far away (channel 5): shares no channel with the others
    templates = Templates(waveforms, index[[0, 1, 0, 5]])
    labels = np.array([0, 1, 1, 2, 3, -1, 0])
    merged, pairs = merge_shifted_units(
        labels, templates, num_channels=6, min_similarity=0.95, max_lag=8
    )
    assert pairs == [(0, 1)]
    np.testing.assert_array_equal(merged, [0, 0, 0, 2, 3, -1, 0])
    # the shift must be allowed: at lag 0 nothing merges
    assert (
        merge_shifted_units(labels, templates, num_channels=6, min_similarity=0.95, max_lag=0)[1]
        == []
    )


def test_two_neurons_at_one_site_stay_apart_though_alike_once_shifted():
    from locsort.sort.merge import merge_shifted_units
    from locsort.sort.peel import Templates

    t = np.arange(40)
    trough = -np.exp(-(((t - 15) / 2.0) ** 2))[:, None]
    # both seen on channel 1 (slot 0): a neuron close to the probe, sharp and large there, and
    # one further away, broader and smaller; a sample apart, their shapes agree (cosine 0.97)
    near = trough * np.array([1.0, 0.3, 0.35, 0.1]) * 150
    far = np.roll(trough * np.array([1.0, 0.5, 0.55, 0.3]) * 125, 1, axis=0)
    piece = np.roll(near, 1, axis=0) * 0.97  # the near neuron's spikes detected a sample later
    templates = Templates(
        np.stack([near, far, piece]).astype(np.float32), np.tile([1, 0, 2, 3], (3, 1))
    )
    labels = np.array([0, 1, 2, 0, 1, 2])
    merged, pairs = merge_shifted_units(labels, templates, num_channels=4, min_similarity=0.95)
    assert pairs == [(0, 2)]
    np.testing.assert_array_equal(merged, [0, 1, 0, 0, 1, 0])
    # what keeps them apart is their size on the shared centre, not their shapes
    assert (
        len(
            merge_shifted_units(
                labels, templates, num_channels=4, min_similarity=0.95, max_trough_ratio=np.inf
            )[1]
        )
        == 2
    )


def test_a_unit_repeating_another_units_spikes_is_found_the_larger_one_kept():
    from locsort.sort.postprocess import duplicate_units

    rng = np.random.default_rng(3)
    real = np.sort(rng.choice(300_000, 400, replace=False))
    echo = real[rng.random(400) < 0.6] + 6  # late copies of 60 % of its spikes, 0.2 ms later
    independent = np.sort(rng.choice(300_000, 300, replace=False))
    lag = Params().constants.duplicate_unit_max_lag_ms
    assert duplicate_units(_sorting([real, echo, independent]), min_shared=0.5, max_lag_ms=lag) == [
        1
    ]
    assert duplicate_units(_sorting([real, independent]), min_shared=0.5, max_lag_ms=lag) == []
    # copies on far channels come up to ~0.7 ms late: found within the default lag, not within
    # 0.4 ms
    late = real[rng.random(400) < 0.6] + 21
    assert duplicate_units(_sorting([real, late, independent]), min_shared=0.5, max_lag_ms=lag) == [
        1
    ]
    assert (
        duplicate_units(_sorting([real, late, independent]), min_shared=0.5, max_lag_ms=0.4) == []
    )
    # most of a unit repeated 2 ms late (the generated polytrode's and four-shank probe's)
    later = real[rng.random(400) < 0.9] + 60
    assert duplicate_units(
        _sorting([real, later, independent]), min_shared=0.5, max_lag_ms=lag
    ) == [1]
    # a small copy of a large unit (agreement 40 / 400 = 0.1, below SpikeInterface's default
    # pre-filter of 0.2)
    few = np.sort(rng.choice(real, 40, replace=False)) + 21
    assert duplicate_units(_sorting([real, few, independent]), min_shared=0.5, max_lag_ms=lag) == [
        1
    ]
    # the same test on training-sample clusters (one time axis, -1: no cluster) flags the copy's
    # spikes
    from locsort.sort.postprocess import repeated_unit_spikes

    times = np.concatenate([real, late, independent, [150_000]])
    units = np.concatenate(
        [np.zeros(len(real)), np.ones(len(late)), np.full(len(independent), 2), [-1]]
    ).astype(np.int64)
    shuffle = rng.permutation(len(times))
    flagged = repeated_unit_spikes(times[shuffle], units[shuffle], 30_000.0, 0.5, lag)
    assert np.array_equal(flagged, units[shuffle] == 1)


def test_a_larger_units_spikes_detected_again_at_one_lag_are_removed_from_the_smaller_unit():
    from locsort.sort.postprocess import lagged_copy_spikes

    rng = np.random.default_rng(5)
    length = 1_800_000  # 60 s at 30 kHz, in two segments
    source = np.sort(rng.choice(length, 600, replace=False))
    copied = np.sort(rng.choice(source, 120, replace=False))
    copies = copied + 11 + rng.integers(-1, 2, 120)  # 0.37 ms later, +-1 sample
    own = np.sort(rng.choice(length, 300, replace=False))  # the smaller unit's own spikes
    other = np.sort(rng.choice(length, 500, replace=False))  # a third unit, independent
    samples = np.concatenate([source, copies, own, other])
    units = np.concatenate([np.zeros(600), np.ones(120 + 300), np.full(500, 2)]).astype(np.int64)
    amplitudes = np.concatenate([np.full(600, -200.0), np.full(420, -60.0), np.full(500, -90.0)])
    is_copy = np.zeros(len(samples), bool)
    is_copy[600:720] = True
    half = length // 2  # the same spikes in two segments of half the length
    segments = (samples >= half).astype(np.int64)
    within = samples - segments * half
    crossing = np.zeros(
        len(samples), bool
    )  # a copy whose source lies in the other segment is not one there
    crossing[600:720] = (copied >= half) != (copies >= half)
    args = (30_000.0, length, Params().constants.lagged_copy_max_lag_ms)
    drop = lagged_copy_spikes(segments, within, units, amplitudes, *args, min_share=0.02)
    assert drop[is_copy & ~crossing].all()
    assert (
        not drop[units == 0].any() and not drop[units == 2].any()
    )  # the larger unit keeps its spikes; others untouched
    assert (
        drop[600 + 120 : 1020].sum() <= 3
    )  # the smaller unit's own spikes that fall at that lag by chance
    # never with min_share 1, nor when the copies are too few to stand out from chance
    assert not lagged_copy_spikes(segments, within, units, amplitudes, *args, min_share=1.0).any()
    few = np.flatnonzero(is_copy)[6:]
    assert not lagged_copy_spikes(
        np.delete(segments, few),
        np.delete(within, few),
        np.delete(units, few),
        np.delete(amplitudes, few),
        *args,
        min_share=0.0,
    ).any()
    # the weaker unit is the copy whichever comes first: the same spikes with the amplitudes swapped
    swapped = np.where(units == 0, -60.0, np.where(units == 1, -200.0, -90.0))
    drop = lagged_copy_spikes(segments, within, units, swapped, *args, min_share=0.02)
    assert drop[units == 0].sum() >= 110 and not drop[units == 1].any()


def test_a_unit_whose_far_copies_went_to_a_neighbour_is_kept_and_the_copies_removed():
    """A large unit's spikes detected again on far channels and given to a small neighbour make
    the large unit repeat the neighbour's spikes: the copies must go, not the large unit."""
    from locsort.sort.postprocess import without_copies

    rng = np.random.default_rng(11)
    length = 1_800_000
    source = np.sort(rng.choice(length, 600, replace=False))
    copied = np.sort(rng.choice(source, 500, replace=False))
    copies = copied + 15 + rng.integers(-1, 2, 500)  # 0.5 ms later, +-1 sample
    own = np.sort(rng.choice(length, 400, replace=False))  # the neighbour's own spikes
    echo = source[rng.random(600) < 0.9] + 60  # a third unit: 90 % of the source, 2 ms late
    samples = np.concatenate([source, copies, own, echo])
    labels = [np.zeros(600), np.ones(500 + 400), np.full(len(echo), 2), [-1]]
    units = np.concatenate(labels).astype(np.int64)
    samples = np.append(samples, 5)  # a spike with no unit stays without one
    amplitudes = np.concatenate(
        [np.full(600, -200.0), np.full(900, -50.0), np.full(len(echo), -40.0), [-30.0]]
    )
    constants = Params().constants
    sort_out = lambda copy_min_share: without_copies(  # noqa: E731
        np.zeros(len(samples), np.int64),
        samples,
        units,
        amplitudes,
        30_000.0,
        length,
        copy_max_lag_ms=constants.lagged_copy_max_lag_ms,
        copy_min_share=copy_min_share,
        duplicate_max_lag_ms=constants.duplicate_unit_max_lag_ms,
        duplicate_min_shared=constants.duplicate_unit_min_shared,
    )
    kept = sort_out(constants.lagged_copy_min_share)
    assert (kept[:600] == 0).all()  # the large unit keeps every spike
    assert (kept[600:1100] == -1).all()  # its copies leave the neighbour
    assert (kept[1100:1500] == 1).sum() >= 395  # which keeps its own spikes
    assert (kept[1500:] == -1).all()  # the whole late repeat goes, as does nothing else
    # without the spike copies removed first, the large unit was the one removed
    whole_only = sort_out(1.0)
    assert (whole_only[:600] == -1).all() and (whole_only[600:1500] == 1).all()


def test_peeling_looks_again_only_where_the_first_detection_found_nothing():
    from locsort.sort.peel import unclaimed

    neighbours = np.array(
        [[0, 1, -1], [1, 0, 2], [2, 1, 3], [3, 2, -1]]
    )  # 4 channels in a row, radius: next ones
    free = unclaimed(
        (100, 4), rows=np.array([40]), channels=np.array([1]), neighbours=neighbours, sweep=3
    )
    assert not free[37:44, 0:3].any()  # +-3 samples on channel 1 and its neighbours 0 and 2
    assert free[:, 3].all() and free[:37].all() and free[44:].all()
    assert unclaimed((10, 4), np.zeros(0, np.int64), np.zeros(0, np.int64), neighbours, 3).all()


def test_an_unclustered_spike_goes_to_the_cluster_whose_template_explains_it_down_to_the_noise():
    from locsort.sort.peel import Templates, adopt

    rng = np.random.default_rng(6)
    shapes = rng.standard_normal((2, 14, 4)).astype(np.float32) * 10
    shapes[1, :, 3] *= 0.2  # unit 1 lies mostly on channels 1-3
    templates = Templates(shapes, np.array([[0, 1, 2, 3], [1, 2, 3, 4]]))
    noise = np.ones(5)
    on_0123, on_1234 = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    snippets = rng.standard_normal((6, 14, 4)).astype(
        np.float32
    )  # unit noise everywhere (row 2: nothing else)
    channels = np.array([on_1234, on_0123, on_0123, on_0123, on_0123, on_0123])
    snippets[1, :, 1:4] += shapes[
        1, :, :3
    ]  # unit 1 detected one channel lower than its usual centre
    snippets[3, 2:, :] += shapes[0, :-2]  # unit 0, two samples late
    snippets[4] += (
        shapes[0] + rng.standard_normal((14, 4)).astype(np.float32) * 15
    )  # unit 0 under another spike
    units = np.array([0, -1, -1, -1, -1, -1])
    open_rows = np.array([1, 2, 3, 4])  # row 5 (a known copy) is not open
    adopted = adopt(
        snippets, channels, units, open_rows, templates, min_fit=0.5, noise=noise, max_residual=1.3
    )
    np.testing.assert_array_equal(adopted, [0, 1, -1, 0, -1, -1])
    np.testing.assert_array_equal(units, [0, -1, -1, -1, -1, -1])  # the input is left alone
    anything = adopt(
        snippets, channels, units, open_rows, templates, min_fit=0.5, noise=noise, max_residual=1e9
    )
    assert (
        anything[4] == 0
    )  # what the residual test refused: the template fits, but leaves another spike
    assert anything[2] == -1  # noise is not fitted by either template at all


def test_a_templates_match_with_noise_alone_is_the_same_however_the_noise_is_correlated():
    from locsort.preprocess import noise_correlations
    from locsort.sort.peel import Significance, Templates

    rng = np.random.default_rng(7)
    channels, length, span, before = 6, 60_000, 16, 6
    shape = np.zeros((span, channels), np.float32)
    shape[before - 2 : before + 3, :3] = -np.array([2, 5, 8, 5, 2])[:, None] * np.array(
        [1.0, 0.6, 0.3]
    )
    templates = Templates(shape[None], np.arange(channels)[None])
    rows = rng.integers(span, length - span, 3000)
    units = np.zeros(len(rows), np.int64)

    def z_on(noise):
        covariance, autocorrelation = noise_correlations(
            [noise.astype(np.float32)], noise.std(axis=0), span
        )
        significance = Significance.fit(templates, covariance, autocorrelation)
        return (
            covariance,
            autocorrelation,
            significance,
            significance.z(noise, rows, units, templates.channels, before),
        )

    white = rng.standard_normal((length + 1, channels))
    _, _, _, z_white = z_on(white[1:])
    correlated = (0.7 * white[1:] + 0.7 * white[:-1]) @ (
        np.eye(channels) + 0.8
    )  # channels at ~0.9, samples at ~0.5
    covariance, autocorrelation, significance, z_correlated = z_on(correlated)
    np.testing.assert_allclose(covariance, np.cov(correlated.T), rtol=0.05)
    assert (
        autocorrelation[0] == 1
        and abs(autocorrelation[1] - 0.5) < 0.03
        and abs(autocorrelation[3]) < 0.03
    )
    # in noise SDs the match with noise alone is distributed alike (a best of 3 shifts of a unit
    # normal)
    assert abs(np.std(z_correlated) - np.std(z_white)) < 0.08
    assert abs(np.percentile(z_correlated, 99) - np.percentile(z_white, 99)) < 0.4
    with_spikes = correlated.copy()
    for row in rows[:200]:
        with_spikes[row - before : row - before + span] += shape
    z_spikes = significance.z(with_spikes, rows[:200], units[:200], templates.channels, before)
    assert np.percentile(z_spikes, 5) > np.percentile(z_correlated, 99.9)


def test_a_late_spikes_template_match_is_found_within_the_shift_window_and_noise_stays_low():
    from locsort.sort.peel import Significance, Templates

    rng = np.random.default_rng(3)
    channels, length, span, before, late = 4, 20_000, 20, 8, 7
    shape = np.zeros((span, channels), np.float32)
    shape[before - 2 : before + 3, :2] = -np.array([3, 8, 12, 8, 3])[:, None] * np.array([1.0, 0.5])
    templates = Templates(shape[None], np.arange(channels)[None])
    significance = Significance.fit(
        templates, np.eye(channels), np.array([1.0])
    )  # white noise of SD 1
    traces = rng.standard_normal((length, channels)).astype(np.float32)
    rows = np.arange(100, length - 100, 400)
    for row in rows:
        traces[row - before : row - before + span] += shape
    units = np.zeros(len(rows), np.int64)
    aligned = significance.z(traces, rows, units, templates.channels, before)
    # detected `late` samples after the template's time (the unit seen on another channel first)
    narrow = significance.z(traces, rows + late, units, templates.channels, before)
    wide = significance.z(
        traces, rows + late, units, templates.channels, before, max_shift=late + 1
    )
    assert aligned.min() > 10 and narrow.max() < 5
    np.testing.assert_allclose(
        wide, np.maximum(aligned, wide), rtol=1e-5
    )  # the aligned match is among the shifts
    noise_only = significance.z(
        traces, rows + 200, units, templates.channels, before, max_shift=late + 1
    )
    assert np.median(noise_only) < 2.5  # the best of 17 shifts of noise is still far below a spike


def test_a_unit_keeps_only_the_spikes_detected_on_its_own_shank():
    from locsort.sort.postprocess import on_one_shank

    units = np.array([0, 0, 0, 1, 1, 1, -1, 0])
    shanks = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(on_one_shank(units, shanks), [0, 0, -1, 1, 1, -1, -1, 0])
    one = np.zeros(8, int)  # a single shank: nothing changes
    np.testing.assert_array_equal(on_one_shank(units, one), units)


def test_a_unit_of_two_neighbours_collisions_is_removed_and_independent_units_kept():
    from locsort.sort.postprocess import collision_units

    rng = np.random.default_rng(0)
    fs, length = 30_000.0, 60 * 30_000

    def poisson(rate_hz):
        return np.sort(rng.choice(length, int(rate_hz * 60), replace=False))

    # four independent neurons 20 µm apart at 20-40 Hz (chance coincidences near 0.2), a collision
    # unit at 40 µm whose 60 spikes each fall 4-12 samples after a spike of unit 0 or unit 1, the
    # same collisions 300 µm away (no neighbour there), and 3 collisions only (too few to tell)
    trains = [poisson(rate) for rate in (40, 30, 20, 40)]
    pick = lambda u, n: rng.choice(trains[u], n, replace=False) + rng.integers(4, 13, n)
    collided = np.concatenate([pick(0, 30), pick(1, 30)])
    trains += [collided, collided + 0, pick(2, 3)]
    where = [(0, 0), (0, 20), (0, 40), (0, 60), (10, 40), (0, 340), (0, 30)]
    samples = np.concatenate(trains)
    units = np.concatenate([np.full(len(t), u) for u, t in enumerate(trains)])
    xy = np.concatenate([np.tile(where[u], (len(t), 1)) for u, t in enumerate(trains)])
    segments = np.zeros(len(samples), int)
    kwargs = dict(window_ms=0.8, radius_um=100.0)
    found = collision_units(segments, samples, units, *xy.T, fs, length, min_excess=0.5, **kwargs)
    assert found == [4]
    assert (
        collision_units(segments, samples, units, *xy.T, fs, length, min_excess=1, **kwargs) == []
    )
    # the same spikes in two segments: one time axis with no coincidence across the boundary
    half = samples >= length // 2
    two = collision_units(
        half.astype(int),
        samples - half * (length // 2),
        units,
        *xy.T,
        fs,
        length,
        min_excess=0.5,
        **kwargs,
    )
    assert two == [4]
