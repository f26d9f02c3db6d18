"""locsort.report.write_report on a tiny generated recording (5 s, 32 channels, 5 units)."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from locsort.report import write_report
from locsort.spikes import SPIKE_DTYPE


@pytest.fixture(scope="module")
def data():
    from spikeinterface.core import generate_ground_truth_recording

    recording, gt_sorting = generate_ground_truth_recording(
        durations=[5.0], sampling_frequency=30000.0, num_channels=32, num_units=5, seed=0
    )
    vector = gt_sorting.to_spike_vector()
    locations = np.asarray(gt_sorting.get_property("gt_unit_locations"), dtype=float)
    channel_xy = recording.get_channel_locations()[:, :2]
    nearest = np.argmin(np.linalg.norm(channel_xy[None] - locations[:, None, :2], axis=2), axis=1)
    rng = np.random.default_rng(1)
    spikes = np.zeros(len(vector), dtype=SPIKE_DTYPE)
    spikes["sample_index"] = vector["sample_index"]
    spikes["segment_index"] = vector["segment_index"]
    spikes["channel_index"] = nearest[vector["unit_index"]]
    traces = recording.get_traces(segment_index=0)  # 5 s x 32 channels: tiny
    channels = nearest[vector["unit_index"]]
    window = np.clip(
        vector["sample_index"][:, None] + np.arange(-10, 11)[None, :], 0, len(traces) - 1
    )
    spikes["amplitude"] = traces[window, channels[:, None]].min(axis=1)
    spikes["x"] = locations[vector["unit_index"], 0] + rng.normal(0, 3, len(vector))
    spikes["y"] = locations[vector["unit_index"], 1] + rng.normal(0, 3, len(vector))
    for name in ("z", "alpha", "x_std", "y_std", "z_std"):
        spikes[name] = np.nan
    spikes["unit_index"] = vector["unit_index"]
    spikes["unit_index"][::10] = -1  # a few unassigned spikes
    ground_truth = SimpleNamespace(sorting=gt_sorting, unit_locations=locations)
    return recording, gt_sorting, spikes, ground_truth


def _sorting_from(spikes, num_units, fs=30000.0):
    from spikeinterface.core import NumpySorting

    keep = spikes["unit_index"] >= 0
    return NumpySorting.from_samples_and_labels(
        [spikes["sample_index"][keep]],
        [spikes["unit_index"][keep].astype(int)],
        fs,
        unit_ids=np.arange(num_units),
    )


def _cell(page: str, cell_id: str) -> str:
    match = re.search(rf'id="{cell_id}">([^<]*)<', page)
    assert match, f"no cell {cell_id}"
    return match.group(1)


def _check_report(html_path: Path, expected_figures: set[str]) -> str:
    from matplotlib.image import imread

    assert html_path.exists() and html_path.name == "report.html"
    page = html_path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*src=", page, re.I)  # its one script is inline
    assert "http://" not in page and "https://" not in page
    pngs = sorted((html_path.parent / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert expected_figures <= names, f"missing figures: {expected_figures - names}"
    referenced = set(re.findall(r'src="figures/([^"]+)"', page))
    assert referenced == names  # every PNG referenced, nothing referenced that is missing
    for png in pngs:
        image = imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100, png.name
        flat = image.reshape(-1, image.shape[-1])
        assert np.ptp(flat, axis=0).max() > 0.1, f"{png.name} is a single colour"
    return page


def test_report_with_ground_truth(data, tmp_path):
    recording, gt_sorting, spikes, ground_truth = data
    sorting = _sorting_from(spikes, 5)
    evaluation = {
        "localization": {"median_xy_um": 3.5, "mean_xy_um": 4.1, "n": 300},
        "sorting": {
            "mean_accuracy": 0.86,
            "well_detected": 4,
            "num_gt_units": 5,
            "num_units": 5,
            "false_positive_units": 0,
            "accuracy_per_unit": [0.9, 0.95, 0.6, 0.88, 0.97],
        },
    }
    import matplotlib

    backend = matplotlib.get_backend()
    html_path = write_report(
        tmp_path / "run",
        recording=recording,
        spikes=spikes,
        sorting=sorting,
        title="test <run> & co",
        timings={"detect": 1.25, "localize": 3.5},
        evaluation=evaluation,
        ground_truth=ground_truth,
        params={"detect_threshold": 5.0, "method": "center_of_mass", "nested": {"a": 1}},
        seed=0,
    )
    assert html_path == tmp_path / "run" / "report.html"
    assert matplotlib.get_backend() == backend  # the caller's matplotlib state is untouched
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
    page = _check_report(
        html_path, {"locations.png", "templates.png", "activity.png", "accuracy.png", "errors.png"}
    )
    assert _cell(page, "num-spikes") == str(len(spikes))
    assert _cell(page, "num-units") == "5"
    assert _cell(page, "num-channels") == "32"
    assert _cell(page, "sampling-rate") == "30000"
    assert _cell(page, "duration") == "5.00"
    n_assigned = int((spikes["unit_index"] >= 0).sum())
    counts = np.bincount(spikes["unit_index"][spikes["unit_index"] >= 0], minlength=5)
    assert _cell(page, "num-assigned").startswith(f"{n_assigned} (")
    assert float(_cell(page, "spikes-per-unit-median")) == pytest.approx(np.median(counts))
    assert "test &lt;run&gt; &amp; co" in page and "<run>" not in page
    assert "detect_threshold" in page and "nested.a" in page and "center_of_mass" in page
    assert "mean_accuracy" in page and "median_xy_um" in page
    assert "could not be made" not in page
    assert ">4.75<" in page  # timings total


def test_report_without_ground_truth(data, tmp_path):
    recording, _, spikes, _ = data
    sorting = _sorting_from(spikes, 5)
    html_path = write_report(
        tmp_path, recording=recording, spikes=spikes, sorting=sorting, max_spikes_plotted=100
    )
    page = _check_report(html_path, {"locations.png", "templates.png", "activity.png"})
    assert not (tmp_path / "figures" / "accuracy.png").exists()
    assert not (tmp_path / "figures" / "errors.png").exists()
    assert _cell(page, "num-spikes") == str(len(spikes))


def test_report_empty(data, tmp_path):
    from spikeinterface.core import NumpySorting

    recording, _, _, ground_truth = data
    spikes = np.zeros(0, dtype=SPIKE_DTYPE)
    sorting = NumpySorting.from_samples_and_labels(
        [np.array([], int)], [np.array([], int)], 30000.0
    )
    html_path = write_report(
        tmp_path, recording=recording, spikes=spikes, sorting=sorting, ground_truth=ground_truth
    )
    page = _check_report(html_path, {"locations.png"})
    assert "No spikes detected" in page or "no spikes detected" in page
    assert _cell(page, "num-spikes") == "0"
    assert _cell(page, "num-units") == "0"


def test_report_one_unit_nan_locations(data, tmp_path):
    recording, _, spikes, _ = data
    spikes = spikes.copy()
    spikes["x"] = np.nan
    spikes["y"] = np.nan
    spikes["unit_index"] = np.where(spikes["unit_index"] >= 0, 0, -1)
    sorting = _sorting_from(spikes, 1)
    html_path = write_report(tmp_path, recording=recording, spikes=spikes, sorting=sorting)
    page = _check_report(html_path, {"locations.png", "templates.png", "activity.png"})
    assert _cell(page, "num-units") == "1"
    assert "could not be made" not in page


def test_report_multi_segment_multi_shank(tmp_path):
    from probeinterface import ProbeGroup, generate_linear_probe
    from spikeinterface.core import NumpySorting, generate_recording

    recording = generate_recording(
        num_channels=16, sampling_frequency=10000.0, durations=[1.0, 0.5], seed=0
    )
    group = ProbeGroup()
    for shank in range(2):
        probe = generate_linear_probe(num_elec=8, ypitch=20)
        probe.move([shank * 200.0, 0.0])
        group.add_probe(probe)
    group.set_global_device_channel_indices(np.arange(16))
    recording.set_probegroup(group)  # in place
    rng = np.random.default_rng(0)
    n = 120
    spikes = np.zeros(n, dtype=SPIKE_DTYPE)
    spikes["segment_index"] = rng.integers(0, 2, n)
    spikes["sample_index"] = np.where(
        spikes["segment_index"] == 0, rng.integers(0, 10000, n), rng.integers(0, 5000, n)
    )
    spikes["channel_index"] = rng.integers(0, 16, n)
    spikes["amplitude"] = -rng.uniform(40, 120, n)
    spikes["x"] = rng.choice([0.0, 200.0], n) + rng.normal(0, 5, n)
    spikes["y"] = rng.uniform(0, 140, n)
    spikes["z"] = np.nan
    spikes["unit_index"] = rng.integers(-1, 3, n)
    order = np.lexsort((spikes["sample_index"], spikes["segment_index"]))
    spikes = spikes[order]
    keep = spikes["unit_index"] >= 0
    samples = [spikes["sample_index"][keep & (spikes["segment_index"] == s)] for s in range(2)]
    labels = [
        spikes["unit_index"][keep & (spikes["segment_index"] == s)].astype(int) for s in range(2)
    ]
    sorting = NumpySorting.from_samples_and_labels(samples, labels, 10000.0)
    html_path = write_report(tmp_path, recording=recording, spikes=spikes, sorting=sorting)
    page = _check_report(html_path, {"locations.png", "templates.png", "activity.png"})
    assert _cell(page, "num-segments") == "2"
    assert _cell(page, "num-spikes") == str(n)
    assert "could not be made" not in page


def test_unit_templates_average_up_to_the_quota_of_spikes_of_frequent_and_rare_units():
    """Traces that are zero except for one known waveform per unit at its spike times: each
    template is that waveform exactly (SD 0), from TEMPLATE_SPIKES_PER_UNIT spikes of a frequent
    unit (read in shared stretches) and from every spike of a rare one (read on its own)."""
    from spikeinterface.core import NumpyRecording, NumpySorting

    from locsort.report import (
        TEMPLATE_SPIKES_PER_UNIT,
        _compute_templates,
        _Context,
        _template_reads,
    )

    fs, num_samples = 30000.0, 300_000
    rng = np.random.default_rng(0)
    # spikes 100 samples apart or more, so that no other spike reaches a 90-sample window
    frequent = np.sort(rng.choice(np.arange(100, 200_000, 100), size=400, replace=False))
    rare = np.array(
        [210_000, 230_000, 250_000, 270_000, 299_990]
    )  # the last is too close to the end for a window
    shape = np.sin(np.linspace(0, 3 * np.pi, 40)) * np.hanning(40)
    traces = np.zeros((num_samples, 4), np.float32)
    for times, channel, gain in ((frequent, 1, -50.0), (rare, 3, 30.0)):
        for t in times:
            traces[t - 10 : t + 30, channel] += (gain * shape)[: num_samples - t + 10]
    recording = NumpyRecording([traces], fs)
    recording.set_dummy_probe_from_locations(np.column_stack([np.zeros(4), np.arange(4) * 20.0]))
    spikes = np.zeros(len(frequent) + len(rare), dtype=SPIKE_DTYPE)
    spikes["sample_index"] = np.r_[frequent, rare]
    spikes["unit_index"] = np.r_[np.zeros(len(frequent)), np.ones(len(rare))]
    order = np.argsort(spikes["sample_index"])
    spikes = spikes[order]
    sorting = NumpySorting.from_samples_and_labels(
        [spikes["sample_index"]], [spikes["unit_index"].astype(int)], fs
    )
    ctx = _Context(recording, spikes, sorting, 1000, np.random.default_rng(0))
    mean, sd, counts, nbefore = _compute_templates(ctx, np.array([0, 1]))
    assert counts.tolist() == [TEMPLATE_SPIKES_PER_UNIT, len(rare) - 1]
    # the frequent unit has ~15 spikes per 0.25 s stretch: its 100 come from a few shared reads
    reads = _template_reads(ctx, np.array([0, 1]), nbefore, mean.shape[1])
    assert len(reads) <= 15 and sum(len(rows) for _, _, _, rows, _ in reads) == counts.sum()
    for k, (channel, gain) in enumerate(((1, -50.0), (3, 30.0))):
        expected = np.zeros(mean.shape[1])
        expected[nbefore - 10 : nbefore + 30] = gain * shape
        np.testing.assert_allclose(mean[k, :, channel], expected, atol=1e-4)
        assert np.abs(np.delete(mean[k], channel, axis=1)).max() == 0 and sd[k].max() < 1e-3


def test_the_firing_rate_heat_map_keeps_each_shanks_units_together_deepest_first():
    from spikeinterface.core import generate_recording

    from locsort.report import _Context, _heat_map_order
    from locsort.simulate import neuropixels2_like_probe

    probe = neuropixels2_like_probe(16, num_shanks=2)
    probe.set_shank_ids(np.zeros(16, int).astype(str))  # no shank ids: inferred from the gap
    recording = generate_recording(num_channels=16, sampling_frequency=10000.0, durations=[1.0])
    recording.set_probe(probe)  # in place
    xy = recording.get_channel_locations()
    shank_of = (xy[:, 0] > xy[:, 0].mean()).astype(int)
    # units 0, 2 on the second shank, 1, 3 on the first; y interleaves the shanks
    unit_y = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    unit_shank = {0: 1, 1: 0, 2: 1, 3: 0}
    spikes = np.zeros(40, dtype=SPIKE_DTYPE)
    spikes["unit_index"] = np.repeat(np.arange(4), 10)
    spikes["sample_index"] = np.arange(40) * 200
    for unit in range(4):
        rows = spikes["unit_index"] == unit
        spikes["channel_index"][rows] = np.flatnonzero(shank_of == unit_shank[unit])[0]
        spikes["y"][rows] = unit_y[unit]
    spikes["x"] = 0.0
    ctx = _Context(recording, spikes, None, 100, np.random.default_rng(0))
    order, shanks = _heat_map_order(ctx)
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    np.testing.assert_array_equal(shanks, [1, 0, 1, 0])
