"""Each bad input gives one clear line, the right exit code (2 usage, 1 runtime), no
traceback, and no output folder that looks finished."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import probeinterface as pi
import pytest

from locsort.cli import main
from locsort.simulate import neuropixels_like_probe


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, lines


def _assert_one_line_error(code, lines, expected_code, *words):
    assert code == expected_code
    assert len(lines) == 1, lines
    assert lines[0].startswith("locsort: error:")
    assert "Traceback" not in lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.fixture
def probe_json(tmp_path):
    path = tmp_path / "probe.json"
    pi.write_probeinterface(path, neuropixels_like_probe(64))
    return path


def _write_binary(path: Path, traces) -> Path:
    np.asarray(traces).tofile(path)
    return path


def _binary_args(path, probe, out, channels=64):
    return [
        "run",
        str(path),
        "--probe",
        str(probe),
        "--sampling-frequency",
        "30000",
        "--num-channels",
        str(channels),
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--quiet",
    ]


def test_missing_path_through_the_installed_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "locsort.cli",
            "run",
            str(tmp_path / "nope.bin"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"locsort: error: recording not found: {tmp_path / 'nope.bin'}"
    ]
    assert not (tmp_path / "o").exists()


def test_unknown_format(tmp_path, capsys):
    path = tmp_path / "rec.xyz"
    path.write_bytes(b"\0" * 128)
    code, lines = _run(["run", str(path), "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, lines, 2, "--format")


@pytest.mark.parametrize("drop", ["--sampling-frequency", "--num-channels", "--probe"])
def test_raw_binary_without_required_information(tmp_path, probe_json, capsys, drop):
    path = _write_binary(tmp_path / "rec.bin", np.zeros((3000, 64), np.float32))
    args = _binary_args(path, probe_json, tmp_path / "o")
    i = args.index(drop)
    del args[i : i + 2]
    code, lines = _run(args, capsys)
    _assert_one_line_error(code, lines, 2, drop)


def test_probe_with_wrong_contact_count(tmp_path, capsys):
    probe = tmp_path / "probe32.json"
    pi.write_probeinterface(probe, neuropixels_like_probe(32))
    path = _write_binary(tmp_path / "rec.bin", np.zeros((3000, 64), np.float32))
    code, lines = _run(_binary_args(path, probe, tmp_path / "o"), capsys)
    _assert_one_line_error(code, lines, 2, "32 contacts", "64 channels")


def test_file_size_not_a_multiple_of_frame_size(tmp_path, probe_json, capsys):
    path = tmp_path / "rec.bin"
    path.write_bytes(b"\0" * (64 * 4 * 100 + 6))
    code, lines = _run(_binary_args(path, probe_json, tmp_path / "o"), capsys)
    _assert_one_line_error(code, lines, 2, "not a multiple", "--num-channels")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_samples(tmp_path, probe_json, capsys, bad):
    traces = np.random.default_rng(0).normal(0, 5, (60_000, 64)).astype(np.float32)
    traces[45_000, 3] = bad
    path = _write_binary(tmp_path / "rec.bin", traces)
    out = tmp_path / "o"
    code, lines = _run(_binary_args(path, probe_json, out), capsys)
    _assert_one_line_error(code, lines, 1, "NaN or Inf")
    assert not out.exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_recording_shorter_than_one_chunk_runs(tmp_path, ground_truth_recording, capsys):
    recording, _ = ground_truth_recording
    traces = recording.get_traces(start_frame=0, end_frame=12_000)  # 0.4 s < 1 s chunk
    path = _write_binary(tmp_path / "rec.bin", traces)
    probe = tmp_path / "probe.json"
    pi.write_probeinterface(probe, neuropixels_like_probe(64))
    out = tmp_path / "o"
    code, lines = _run(_binary_args(path, probe, out), capsys)
    assert code == 0, lines
    spikes = np.load(out / "spikes.npy")
    assert len(spikes) > 0 and spikes["sample_index"].max() < 12_000


def test_recording_without_spikes_gives_empty_outputs(tmp_path, probe_json, capsys):
    import spikeinterface as si

    traces = np.random.default_rng(0).normal(0, 5, (90_000, 64)).astype(np.float32)
    path = _write_binary(tmp_path / "rec.bin", traces)
    out = tmp_path / "o"
    code, lines = _run(
        _binary_args(path, probe_json, out) + ["--param", "detect_threshold=50"], capsys
    )
    assert code == 0, lines
    assert len(np.load(out / "spikes.npy")) == 0
    assert len(si.load(out / "sorting").unit_ids) == 0
    assert (out / "report.html").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, probe_json, capsys):
    path = _write_binary(
        tmp_path / "rec.bin", np.random.default_rng(0).normal(0, 5, (30_000, 64)).astype(np.float32)
    )
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, lines = _run(_binary_args(path, probe_json, out), capsys)
    _assert_one_line_error(code, lines, 2, "already exists", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"
    code, lines = _run(_binary_args(path, probe_json, out) + ["--overwrite"], capsys)
    assert code == 0 and not (out / "mine.txt").exists() and (out / "run.json").exists()


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return folder
    shutil.rmtree(folder / "probe")  # root ignores permission bits: use a read-only mount instead
    for candidate in (Path("/sys"), Path("/proc/sys")):
        try:
            (candidate / "locsort-probe").mkdir()
        except OSError:
            return candidate
        os.rmdir(candidate / "locsort-probe")
    pytest.skip("no read-only location available to this user")


def test_read_only_output_location(tmp_path, probe_json, capsys):
    path = _write_binary(tmp_path / "rec.bin", np.zeros((30_000, 64), np.float32))
    locked = _read_only_folder(tmp_path)
    code, lines = _run(_binary_args(path, probe_json, locked / "out"), capsys)
    _assert_one_line_error(code, lines, 2, "cannot write")


def test_nwb_file_follows_the_output_folders_rules(tmp_path, capsys):
    existing = tmp_path / "there.nwb"
    existing.write_bytes(b"keep me")
    demo = ["demo", "--duration", "2", "--units", "3", "--out", str(tmp_path / "o"), "--nwb"]
    for nwb, flags, words in (
        (existing, [], ("already exists", "--overwrite")),
        (tmp_path / "units.txt", [], (".nwb",)),
        (tmp_path, [], ("folder",)),
        (tmp_path / "u.nwb", ["--param", "analyzer=false"], ("analyzer=False",)),
        (_read_only_folder(tmp_path) / "u.nwb", [], ("cannot write",)),
    ):
        code, lines = _run([*demo, str(nwb), *flags], capsys)
        _assert_one_line_error(code, lines, 2, *words)
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "o").exists()


def test_phy_on_a_multi_segment_recording_is_refused_before_any_work(tmp_path):
    from spikeinterface.core import append_recordings

    import locsort
    from locsort.simulate import generate_recording

    recording, _ = generate_recording(duration=2.0, num_units=3, seed=0)
    two = append_recordings([recording, recording])
    with pytest.raises(locsort.UsageError, match="one segment"):
        locsort.run(two, tmp_path / "out", phy=True, progress=False)
    assert not list(tmp_path.iterdir())  # neither an output nor a work area


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "locsort.cli",
            "run",
            str(tmp_path / "nope.bin"),
            "--out",
            str(tmp_path / "o"),
            "--debug",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_cuda_requested_without_gpu(tmp_path, probe_json, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = _write_binary(tmp_path / "rec.bin", np.zeros((30_000, 64), np.float32))
    code, lines = _run(
        _binary_args(path, probe_json, tmp_path / "o") + ["--device", "cuda"], capsys
    )
    _assert_one_line_error(code, lines, 2, "cuda")


def test_labels_options(tmp_path, probe_json, ground_truth_recording, capsys):
    from spikeinterface.core import NumpySorting

    recording, _ = ground_truth_recording
    path = _write_binary(
        tmp_path / "rec.bin", recording.get_traces(start_frame=0, end_frame=30_000)
    )
    out = tmp_path / "o"
    code, lines = _run(_binary_args(path, probe_json, out) + ["--labels-k", "5"], capsys)
    _assert_one_line_error(code, lines, 2, "--labels-k needs --labels")
    code, lines = _run(
        _binary_args(path, probe_json, out) + ["--labels", str(tmp_path / "nope")], capsys
    )
    _assert_one_line_error(code, lines, 2, "labels not found")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    code, lines = _run(
        _binary_args(path, probe_json, out) + ["--labels", str(tmp_path / "junk.npz")], capsys
    )
    _assert_one_line_error(code, lines, 2, "cannot read labels")
    other_rate = NumpySorting.from_samples_and_labels(
        [np.array([100, 200])], [np.array([0, 0])], 20000.0
    )
    other_rate.save(folder=tmp_path / "labels")
    code, lines = _run(
        _binary_args(path, probe_json, out) + ["--labels", str(tmp_path / "labels")], capsys
    )
    _assert_one_line_error(code, lines, 2, "sampling frequency")
    assert not out.exists()
