"""What a user curates with: analyzer/, units.tsv and the Phy folder, read back with the
readers users use (SpikeInterface, pandas, phylib)."""

import datetime
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import spikeinterface as si

from locsort.cli import main
from locsort.constants import Constants
from locsort.curate import (
    ANALYZER_EXTENSIONS,
    LOCSORT_EXTENSIONS,
    UNIT_COLUMNS,
    build_analyzer,
    quality_labels,
    spike_rows,
    units_table,
)
from locsort.spikes import empty_spikes


@pytest.fixture(scope="module")
def output(tmp_path_factory, ground_truth_recording):
    """A CLI run with --phy and --nwb (out/../units.nwb) on a saved recording (6 s of the shared
    10 s one)."""
    recording, truth = ground_truth_recording
    folder = tmp_path_factory.mktemp("curate")
    recording.frame_slice(0, 6 * 30000).save(folder=folder / "rec", progress_bar=False)
    out = folder / "out"
    command = ["run", str(folder / "rec"), "--out", str(out), "--phy", "--quiet"]
    assert main([*command, "--nwb", str(folder / "units.nwb")]) == 0
    return out


def test_the_analyzer_loads_in_spikeinterface_with_locsorts_own_spike_locations(output):
    analyzer = si.load_sorting_analyzer(output / "analyzer")
    for name in (*ANALYZER_EXTENSIONS, *LOCSORT_EXTENSIONS, "quality_metrics"):
        assert analyzer.has_extension(name), name
    sorting = si.load(output / "sorting")
    assert list(analyzer.unit_ids) == list(sorting.unit_ids)
    vector = analyzer.sorting.to_spike_vector()
    locations = analyzer.get_extension("spike_locations").get_data()
    assert len(locations) == len(vector)
    spikes = np.load(output / "spikes.npy")
    assigned = spikes[spikes["unit_index"] >= 0]
    units = np.asarray(analyzer.unit_ids)[vector["unit_index"]]
    for i in np.linspace(0, len(vector) - 1, 25).astype(int):  # the same spike's posterior
        same = assigned[
            (assigned["sample_index"] == vector["sample_index"][i])
            & (assigned["unit_index"] == units[i])
        ]
        assert len(same) >= 1
        assert locations["x"][i] in same["x"] and locations["y"][i] in same["y_registered"]
    waveforms = analyzer.get_extension("random_spikes").get_data()
    assert np.bincount(vector["unit_index"][waveforms]).max() <= Constants().analyzer_max_waveforms


def test_template_similarity_is_spikeinterfaces_definition(output):
    from spikeinterface.core.template_tools import get_dense_templates_array
    from spikeinterface.postprocessing.template_similarity import (
        _compute_similarity_matrix_numpy,
    )

    analyzer = si.load_sorting_analyzer(output / "analyzer")
    templates = get_dense_templates_array(analyzer, return_in_uV=True)
    mask = analyzer.sparsity.mask
    theirs = 1 - _compute_similarity_matrix_numpy(templates, templates, 0, "cosine", mask, mask)[0]
    ours = analyzer.get_extension("template_similarity").get_data()
    assert np.allclose(ours, theirs, atol=1e-4)


def test_units_table_has_one_labelled_row_per_unit_and_good_units_are_true_neurons(
    output, ground_truth_recording
):
    table = pd.read_csv(output / "units.tsv", sep="\t")
    sorting = si.load(output / "sorting")
    assert list(table.columns) == list(UNIT_COLUMNS)
    assert list(table["unit_id"]) == [int(u) for u in sorting.unit_ids]
    assert set(table["quality"]) <= {"good", "mua", "noise"}
    counts = sorting.count_num_spikes_per_unit()
    assert [counts[u] for u in sorting.unit_ids] == list(table["num_spikes"])
    spikes = np.load(output / "spikes.npy")
    unit = table.iloc[0]
    mine = spikes[spikes["unit_index"] == unit["unit_id"]]
    assert unit["x_um"] == pytest.approx(np.median(mine["x"]), abs=1e-3)
    assert (table["amplitude_uv"] < 0).all() and (table["snr"] > 0).all()
    _, truth = ground_truth_recording
    truth_sorting = truth.sorting.frame_slice(0, 6 * 30000)
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    comparison = compare_sorter_to_ground_truth(truth_sorting, sorting, exhaustive_gt=True)
    best = comparison.get_performance()["accuracy"]
    matched = comparison.best_match_12  # truth unit -> sorted unit
    accurate = {int(matched[t]) for t in best.index if best[t] >= 0.8 and matched[t] != -1}
    good = set(table.loc[table["quality"] == "good", "unit_id"])
    assert good, table
    assert len(good & accurate) >= 0.8 * len(good)


def test_the_phy_folder_opens_in_phylib_with_the_sortings_spikes_and_the_labels(output):
    from phylib.io.model import load_model

    model = load_model(output / "phy" / "params.py")
    try:
        sorting = si.load(output / "sorting")
        table = pd.read_csv(output / "units.tsv", sep="\t")
        vector = sorting.to_spike_vector()
        assert model.n_spikes == len(vector)
        assert model.n_templates == len(sorting.unit_ids)
        counts = np.bincount(model.spike_clusters, minlength=len(sorting.unit_ids))
        assert list(counts) == list(table["num_spikes"])
        assert np.array_equal(np.sort(model.spike_samples), np.sort(vector["sample_index"]))
        analyzer = si.load_sorting_analyzer(output / "analyzer")
        assert np.allclose(model.channel_positions, analyzer.get_channel_locations())
        # Phy's amplitudes are locsort's, spike for spike (Phy's spikes in the sorting's order)
        spikes = np.load(output / "spikes.npy")
        expected = spikes["amplitude"][spike_rows(analyzer, spikes)]
        assert np.allclose(np.abs(model.amplitudes), np.abs(expected), rtol=1e-5)
        assert model.metadata["group"] == dict(enumerate(table["quality"]))
        assert model.metadata["snr"][0] == pytest.approx(table["snr"][0], rel=1e-4)
    finally:
        model.close()


def test_labels_follow_the_documented_thresholds_and_undefined_metrics_do_not_count():
    constants = Constants()
    table = pd.DataFrame(
        {
            "snr": [10.0, 2.0, 10.0, 10.0, 10.0, 10.0, np.nan],
            "isi_violations_ratio": [0.0, 0.0, 0.5, 0.0, 0.0, np.nan, 0.0],
            "presence_ratio": [1.0, 1.0, 1.0, 0.3, 1.0, np.nan, 1.0],
            "amplitude_cutoff": [0.0, 0.0, 0.0, 0.0, 0.4, np.nan, 0.0],
            "num_spikes": [500, 500, 500, 500, 500, 500, 500],
        }
    )
    assert list(quality_labels(table, constants)) == [
        "good",
        "noise",
        "mua",
        "mua",
        "mua",
        "good",
        "noise",
    ]
    table["num_spikes"] = constants.good_min_spikes - 1
    assert quality_labels(table, constants)[0] == "mua"


NOISE = np.full(64, 5.0, np.float32)


def _sorting(recording, samples, labels, unit_ids):
    from spikeinterface.core import NumpySorting

    return NumpySorting.from_samples_and_labels(
        [np.asarray(samples, np.int64)],
        [np.asarray(labels, np.int64)],
        recording.get_sampling_frequency(),
        unit_ids=np.asarray(unit_ids, np.int64),
    )


def _spikes(samples, labels):
    spikes = empty_spikes(len(samples))
    spikes["sample_index"], spikes["unit_index"] = samples, labels
    spikes["x"] = spikes["y"] = spikes["y_registered"] = spikes["z"] = 1.0
    return spikes


def test_zero_units_give_an_empty_but_valid_analyzer_and_table(tmp_path, ground_truth_recording):
    recording, _ = ground_truth_recording
    recording = recording.frame_slice(0, 2 * 30000)
    sorting, spikes = _sorting(recording, [], [], []), _spikes([], [])
    analyzer = build_analyzer(
        recording, sorting, spikes, NOISE, tmp_path / "a", Constants(), seed=0, n_jobs=1
    )
    table = units_table(analyzer, spikes, Constants())
    assert len(table) == 0 and list(table.columns) == list(UNIT_COLUMNS)
    assert len(si.load_sorting_analyzer(tmp_path / "a").unit_ids) == 0


def test_a_unit_with_one_spike_gets_nan_where_its_metrics_are_undefined(
    tmp_path, ground_truth_recording
):
    recording, truth = ground_truth_recording
    recording = recording.frame_slice(0, 2 * 30000)
    train = truth.sorting.get_unit_spike_train(truth.sorting.unit_ids[0], end_frame=2 * 30000)
    samples = np.concatenate([train, [31_000]])
    labels = np.concatenate([np.zeros(len(train), int), [1]])
    order = np.argsort(samples, kind="stable")
    samples, labels = samples[order], labels[order]
    sorting, spikes = _sorting(recording, samples, labels, [0, 1]), _spikes(samples, labels)
    analyzer = build_analyzer(
        recording, sorting, spikes, NOISE, tmp_path / "a", Constants(), seed=0, n_jobs=1
    )
    table = units_table(analyzer, spikes, Constants())
    single = table.iloc[1]
    assert single["num_spikes"] == 1 and np.isnan(single["amplitude_cutoff"])
    assert single["quality"] != "good"
    assert table.iloc[0]["num_spikes"] == len(train)


def test_the_nwb_file_reads_back_in_pynwb_and_spikeinterface(output):
    from pynwb import NWBHDF5IO
    from spikeinterface.extractors import read_nwb_sorting

    path = output.parent / "units.nwb"
    sorting = si.load(output / "sorting")
    table = pd.read_csv(output / "units.tsv", sep="\t")
    analyzer = si.load_sorting_analyzer(output / "analyzer")
    with NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        units = nwbfile.units.to_dataframe()
        assert list(units.index) == list(table["unit_id"])
        assert list(units["quality"]) == list(table["quality"])
        assert np.allclose(units["snr"], table["snr"], rtol=1e-4)
        unit = sorting.unit_ids[0]
        train = sorting.get_unit_spike_train(unit) / sorting.get_sampling_frequency()
        assert np.allclose(units.loc[unit, "spike_times"], train)
        template = analyzer.get_extension("templates").get_data()[0]
        assert np.allclose(units.loc[unit, "waveform_mean"], template * 1e-6, atol=1e-9)
        electrodes = nwbfile.electrodes.to_dataframe()
        locations = analyzer.get_channel_locations()
        assert np.allclose(electrodes[["rel_x", "rel_y"]].to_numpy(), locations)
    read = read_nwb_sorting(path)
    assert read.get_sampling_frequency() == sorting.get_sampling_frequency()
    assert np.array_equal(read.get_unit_spike_train(unit), sorting.get_unit_spike_train(unit))
    assert list(read.get_property("quality")) == list(table["quality"])


def test_a_run_without_units_writes_empty_but_valid_outputs_and_says_so(tmp_path):
    from pynwb import NWBHDF5IO
    from spikeinterface.core import NumpyRecording

    import locsort

    traces = np.random.default_rng(0).normal(scale=10.0, size=(90_000, 16)).astype(np.float32)
    recording = NumpyRecording([traces], sampling_frequency=30_000.0)
    xy = np.column_stack([np.tile([0.0, 32.0], 8), np.repeat(np.arange(8) * 20.0, 2)])
    recording.set_dummy_probe_from_locations(xy)
    out = tmp_path / "out"
    result = locsort.run(recording, out, phy=True, nwb=tmp_path / "u.nwb", progress=False)
    assert len(result.sorting.unit_ids) == 0 and "no Phy folder" in result.note
    table = pd.read_csv(out / "units.tsv", sep="\t")
    assert len(table) == 0 and list(table.columns) == list(UNIT_COLUMNS)
    assert len(si.load_sorting_analyzer(out / "analyzer").unit_ids) == 0
    with NWBHDF5IO(str(tmp_path / "u.nwb"), "r") as io:
        assert len(io.read().units) == 0
    assert "No units" in (out / "report.html").read_text()


BROWSER_CHECK = """<html><body><pre id="result">pending</pre>
<iframe id="report" src="REPORT" width="1400" height="900"></iframe>
<script>
document.getElementById("report").addEventListener("load", function () {
  var page = this.contentDocument;
  var units = function () {
    return Array.from(page.querySelectorAll("#units-table tbody tr")).map(function (row) {
      return parseInt(row.cells[0].textContent); });
  };
  var seen = {ready: page.body.dataset.ready, images: [], listed: units()};
  page.querySelectorAll("img").forEach(function (img) {
    seen.images.push([img.getAttribute("src"), img.dataset.loaded]); });
  var snr = Array.from(page.querySelectorAll("#units-table th")).find(function (th) {
    return th.textContent === "SNR"; });
  snr.click(); seen.ascending = units(); snr.click(); seen.descending = units();
  document.getElementById("result").textContent = JSON.stringify(seen);
});
</script></body></html>"""


def test_the_report_shows_every_figure_and_sorts_the_units_in_a_real_browser(output, tmp_path):
    """Headless Chromium opens the report in a frame of a page that clicks the SNR header
    twice: no console message, every image loaded, the rows sorted both ways."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    check = tmp_path / "check.html"
    check.write_text(BROWSER_CHECK.replace("REPORT", (output / "report.html").as_uri()))
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",  # the checking page reads the report's frame
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=30000",
            "--dump-dom",
            check.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["ready"] == "yes"
    images = dict(seen["images"])
    expected = {f"figures/{p.name}" for p in (output / "figures").glob("*.png")}
    assert set(images) == expected and set(images.values()) == {"yes"}
    assert any(name.startswith("figures/unit_") for name in images)
    table = pd.read_csv(output / "units.tsv", sep="\t").set_index("unit_id")
    assert sorted(seen["listed"]) == sorted(table.index)
    snr = table["snr"]
    assert list(snr[seen["ascending"]]) == sorted(snr)
    assert list(snr[seen["descending"]]) == sorted(snr, reverse=True)


def test_nwb_electrode_groups_are_the_shanks_the_sort_found_on_a_probe_that_names_none():
    from pynwb import NWBFile
    from spikeinterface.core import generate_recording

    from locsort.neighbourhood import shank_ids
    from locsort.nwb import _electrodes
    from locsort.simulate import neuropixels2_like_probe

    probe = neuropixels2_like_probe(16, num_shanks=2)
    probe.set_shank_ids(np.zeros(16, int).astype(str))  # the shanks are not named
    recording = generate_recording(num_channels=16, sampling_frequency=10000.0, durations=[0.1])
    recording.set_probe(probe)  # in place
    shanks, note = shank_ids(recording, 100.0)
    assert note and len(np.unique(shanks)) == 2
    made = []
    for given in (None, shanks):
        nwbfile = NWBFile("test", "test", datetime.datetime.now(datetime.timezone.utc))
        _electrodes(nwbfile, recording, given)
        made.append(nwbfile)
    assert len(made[0].electrode_groups) == 1
    assert len(made[1].electrode_groups) == 2
    table = made[1].electrodes.to_dataframe()
    np.testing.assert_array_equal([g.name for g in table["group"]], [f"shank{s}" for s in shanks])
    assert "gap" in made[1].electrode_groups["shank1"].description
