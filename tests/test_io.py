"""Every input format reaches the pipeline through SpikeInterface's readers, with its probe,
and `locsort run` produces the full output folder from a raw binary + probe file and from a
MEArec file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import probeinterface as pi
import pytest
import spikeinterface as si

from format_writers import write_nwb, write_openephys, write_spikeglx
from locsort.cli import main
from locsort.io import detect_format, open_recording
from locsort.simulate import neuropixels_like_probe

SHARED_MEAREC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mearec"


def _probe_file(folder: Path, kind: str, num_channels: int = 64) -> Path:
    probe = neuropixels_like_probe(num_channels)
    path = folder / f"probe.{kind}"
    if kind == "json":
        pi.write_probeinterface(path, probe)
    elif kind == "prb":
        group = pi.ProbeGroup()
        group.add_probe(probe)
        pi.write_prb(path, group)
    else:  # x, y per channel in recording order (probeinterface has no CSV writer)
        rows = ["x,y"] + [f"{x:g},{y:g}" for x, y in probe.contact_positions]
        path.write_text("\n".join(rows) + "\n")
    return path


def _binary(folder: Path, traces: np.ndarray) -> Path:
    path = folder / "rec.bin"
    traces.tofile(path)
    return path


@pytest.mark.parametrize("kind", ["json", "prb", "csv"])
def test_raw_binary_with_each_probe_file_kind(tmp_path, int16_traces, kind):
    path = _binary(tmp_path, int16_traces)
    recording, truth = open_recording(
        path,
        probe=_probe_file(tmp_path, kind),
        sampling_frequency=30000,
        num_channels=64,
        dtype="int16",
    )
    assert truth is None and detect_format(path) == "binary"
    assert recording.get_num_channels() == 64
    np.testing.assert_array_equal(recording.get_traces(), int16_traces)
    np.testing.assert_allclose(
        recording.get_channel_locations(), neuropixels_like_probe(64).contact_positions
    )


def test_spikeglx_folder(tmp_path, int16_traces):
    folder = write_spikeglx(tmp_path, int16_traces[:, :32], 30000.0)
    assert detect_format(folder) == "spikeglx"
    recording, _ = open_recording(folder)
    assert recording.get_num_channels() == 32 and recording.has_probe()
    np.testing.assert_array_equal(recording.get_traces(return_in_uV=False), int16_traces[:, :32])


def test_openephys_folder_with_probe_file(tmp_path, int16_traces):
    folder = write_openephys(tmp_path / "oe", int16_traces, 30000.0)
    assert detect_format(folder) == "openephys"
    recording, _ = open_recording(folder, probe=_probe_file(tmp_path, "json"))
    assert recording.has_probe()
    np.testing.assert_array_equal(recording.get_traces(return_in_uV=False), int16_traces)


def test_openephys_without_probe_is_refused(tmp_path, int16_traces):
    from locsort.errors import UsageError

    folder = write_openephys(tmp_path / "oe", int16_traces, 30000.0)
    with pytest.raises(UsageError, match="no probe"):
        open_recording(folder)


def test_nwb_file(tmp_path, int16_traces):
    locations = neuropixels_like_probe(64).contact_positions
    path = write_nwb(tmp_path / "rec.nwb", int16_traces, 30000.0, locations)
    assert detect_format(path) == "nwb"
    recording, _ = open_recording(path)
    np.testing.assert_allclose(recording.get_channel_locations(), locations)
    np.testing.assert_array_equal(recording.get_traces(return_in_uV=False), int16_traces)


def test_saved_spikeinterface_folder(tmp_path, ground_truth_recording):
    recording, _ = ground_truth_recording
    saved = recording.frame_slice(0, 30000).save(folder=tmp_path / "si_rec")
    assert detect_format(tmp_path / "si_rec") == "si"
    loaded, _ = open_recording(tmp_path / "si_rec")
    np.testing.assert_array_equal(loaded.get_traces(), saved.get_traces())


@pytest.fixture(scope="module")
def mearec_file(tmp_path_factory):
    if not SHARED_MEAREC.exists():
        pytest.skip("../shared/data/mearec is not beside the repository")
    out = tmp_path_factory.mktemp("mearec") / "sq_3s.h5"
    subprocess.run(
        [
            sys.executable,
            str(SHARED_MEAREC / "make_recording.py"),
            str(SHARED_MEAREC / "templates_sqmea_10x10_15um.h5"),
            str(out),
            "--duration",
            "3",
            "--noise",
            "10",
            "--n-exc",
            "8",
            "--n-inh",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_mearec_ground_truth_positions_are_in_spikeinterface_frame(mearec_file):
    recording, truth = open_recording(mearec_file)
    assert truth is not None and len(truth.unit_locations) == len(truth.sorting.unit_ids) == 10
    channels = recording.get_channel_locations()
    # each soma lies over the array (x, y inside its extent) at a positive distance z from it
    assert np.all(truth.unit_locations[:, :2].min(0) >= channels.min(0) - 60)
    assert np.all(truth.unit_locations[:, :2].max(0) <= channels.max(0) + 60)
    assert np.all(truth.unit_locations[:, 2] > 0)


def _check_output(out: Path, recording_channels: int):
    for name in ("spikes.npy", "sorting", "report.html", "run.json"):
        assert (out / name).exists(), name
    spikes = np.load(out / "spikes.npy")
    assert {"sample_index", "x", "y", "z", "alpha", "x_std", "unit_index"} <= set(
        spikes.dtype.names
    )
    sorting = si.load(out / "sorting")
    assigned = spikes[spikes["unit_index"] >= 0]
    assert sorting.to_spike_vector().size == len(assigned)
    info = json.loads((out / "run.json").read_text())
    assert info["recording"]["num_channels"] == recording_channels
    assert info["num_spikes"] == len(spikes)
    assert set(info["timings_s"]) >= {"preprocess", "detect", "localize"}
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary folder left behind"
    return spikes


def test_run_raw_binary_with_probe_json(tmp_path, int16_traces):
    path = _binary(tmp_path, int16_traces)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            str(path),
            "--probe",
            str(_probe_file(tmp_path, "json")),
            "--sampling-frequency",
            "30000",
            "--num-channels",
            "64",
            "--dtype",
            "int16",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    spikes = _check_output(out, 64)
    assert len(spikes) > 100


def test_run_mearec_file_is_scored_against_its_ground_truth(tmp_path, mearec_file):
    out = tmp_path / "out"
    assert main(["run", str(mearec_file), "--out", str(out), "--quiet"]) == 0
    spikes = _check_output(out, 100)
    info = json.loads((out / "run.json").read_text())
    assert info["evaluation"]["sorting"]["num_gt_units"] == 10
    assert info["evaluation"]["localization"]["n"] > 0
    assert len(spikes) > 50
