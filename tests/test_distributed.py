"""Long runs: Dask workers, resumable runs, several recordings, and the faults around them
(a killed run, a killed worker, an unreachable scheduler, a file truncated mid-run, a full
disk). Every run is compared with one uninterrupted single-process reference run, on a
two-shank probe: neighbourhoods, detection and units are kept per shank whatever the chunking,
the workers or a resume."""

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import locsort
from locsort.runners import LocalRunner
from locsort.errors import LocsortError
from locsort.io import open_recording
from locsort.params import params_with
from locsort.simulate import generate_recording, neuropixels2_like_probe
from locsort.workarea import WorkArea, work_area_path

# small chunks so that runs have many of them (training budgets are in epochs by default, so
# two separate runs train the same models)
PARAMS = {"chunk_duration": 0.25}
PARAM_ARGS = [arg for name, value in PARAMS.items() for arg in ("--param", f"{name}={value}")]
NUM_CHUNKS = 40  # 10 s / 0.25 s


@pytest.fixture(scope="module")
def recording_folder(tmp_path_factory):
    """A 10 s recording on a two-shank Neuropixels-2.0-like probe (2 x 32 channels), saved as a
    SpikeInterface binary folder: a file workers can read."""
    recording, _ = generate_recording(
        duration=10.0,
        num_units=20,
        seed=1,
        probe=neuropixels2_like_probe(64, num_shanks=2),
    )
    folder = tmp_path_factory.mktemp("distributed") / "rec"
    recording.save(folder=folder, progress_bar=False)
    return folder


@pytest.fixture(scope="module")
def reference(recording_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    return locsort.run(locsort.io.open_recording(recording_folder)[0], out, PARAMS, progress=False)


def assert_same_spikes(spikes: np.ndarray, expected: np.ndarray) -> None:
    assert len(spikes) == len(expected)
    for name in expected.dtype.names:
        assert np.array_equal(spikes[name], expected[name], equal_nan=True), name


def _environment() -> dict:
    """This process's environment without the thread limits a Dask LocalCluster leaves in it:
    training results depend on the number of threads, and every run here must use the same."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "locsort.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_environment(),
        **kwargs,
    )


def _finished_chunks(out: Path) -> int:
    chunks = work_area_path(out) / "chunks"
    return len(list(chunks.glob("*.npz"))) if chunks.exists() else 0


def test_a_probe_without_shank_ids_sorts_as_if_they_were_named(
    recording_folder, reference, tmp_path
):
    """The shanks are inferred from the gap between them: the same spikes and units, and the
    run says how it read the probe. No unit holds spikes from two shanks."""
    import probeinterface as pi

    recording = open_recording(recording_folder)[0]
    unnamed = pi.Probe(ndim=2)
    unnamed.set_contacts(recording.get_channel_locations(), shapes="circle")
    unnamed.set_device_channel_indices(np.arange(recording.get_num_channels()))
    recording.set_probe(unnamed)  # in place
    assert len(np.unique(recording.get_channel_groups())) == 1
    result = locsort.run(recording, tmp_path / "out", PARAMS, progress=False)
    assert "split into 2 shanks" in result.note
    assert_same_spikes(result.spikes, reference.spikes)
    shank = (recording.get_channel_locations()[:, 0] > 100)[result.spikes["channel_index"]]
    units = result.spikes["unit_index"]
    assert len(np.unique(units[units >= 0])) >= 15
    for unit in np.unique(units[units >= 0]):
        assert len(np.unique(shank[units == unit])) == 1


def test_killed_run_resumes_to_the_same_result(recording_folder, reference, tmp_path):
    out = tmp_path / "out"
    # trained and partly run with a 2-worker local Dask cluster ...
    command = [
        sys.executable,
        "-m",
        "locsort.cli",
        "run",
        str(recording_folder),
        "--out",
        str(out),
        "--quiet",
        "--workers",
        "2",
        *PARAM_ARGS,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_environment()
    )
    while process.poll() is None and _finished_chunks(out) < 3:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)  # kill -9 in the middle of the main pass
    process.wait()
    done = _finished_chunks(out)
    assert 3 <= done < NUM_CHUNKS and not out.exists()

    # ... and continued in a single process: the result of an uninterrupted single-process run
    again = _cli("run", str(recording_folder), "--out", str(out), "--quiet", *PARAM_ARGS)
    assert again.returncode == 0, again.stderr
    assert f"{done} of {NUM_CHUNKS} chunks were already done" in again.stdout
    assert_same_spikes(np.load(out / "spikes.npy"), reference.spikes)
    assert not work_area_path(out).exists()


def _run_on_a_cluster_while(recording_folder, tmp_path, act):
    """``locsort.run`` on a 2-worker local Dask cluster while a thread calls ``act(client, pids,
    worker address, task key)`` once, on the first main-pass chunk task it sees running: (what
    ``act`` returned, or nothing if no task was seen; the run's result)."""
    from distributed import Client, LocalCluster

    recording, _ = open_recording(recording_folder)
    acted, stop = [], threading.Event()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        pids = client.run(os.getpid)

        def watch():
            while not stop.is_set():
                for address, tasks in client.processing().items():
                    keys = [task for task in tasks if "locsort-detect" in str(task)]
                    if keys:
                        acted.append(act(client, pids, address, keys[0]))
                        return
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = locsort.run(
                recording,
                tmp_path / "out",
                PARAMS,
                progress=False,
                scheduler=cluster.scheduler_address,
            )
        finally:
            stop.set()
            watcher.join()
    return acted, result


def test_worker_killed_mid_chunk_is_retried(recording_folder, reference, tmp_path):
    def kill_the_worker(client, pids, address, key):
        os.kill(pids[address], signal.SIGKILL)
        return address

    killed, result = _run_on_a_cluster_while(recording_folder, tmp_path, kill_the_worker)
    assert killed
    assert_same_spikes(result.spikes, reference.spikes)


def test_chunk_task_cancelled_by_the_scheduler_is_submitted_again(
    recording_folder, reference, tmp_path
):
    # after a worker is killed the scheduler may drop a chunk's task ("already forgotten") instead
    # of re-running it; another client cancelling the task forcibly does the same
    from distributed import Future

    def cancel_the_task(client, pids, address, key):
        client.cancel([Future(key, client)], force=True)
        return key

    cancelled, result = _run_on_a_cluster_while(recording_folder, tmp_path, cancel_the_task)
    assert cancelled
    assert_same_spikes(result.spikes, reference.spikes)


def test_unreachable_scheduler_fails_within_the_timeout(recording_folder, tmp_path):
    result = _cli(
        "run",
        str(recording_folder),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--connect-timeout",
        "2",
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("locsort:")]
    assert lines and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


class TruncateDuringMainPass(LocalRunner):
    """Runs chunks here, and cuts ``path`` to half its size once ``after`` main-pass chunks
    are done: a file truncated under a running sorter."""

    def __init__(self, path: Path, after: int):
        super().__init__(threads=1)
        self.path, self.after = path, after

    def map(self, job, chunks, indices, desc="chunks", progress=True):
        for count, item in enumerate(super().map(job, chunks, indices, desc, progress), 1):
            yield item
            if desc.startswith("detect") and count == self.after:
                os.truncate(self.path, self.path.stat().st_size // 2)


def test_file_truncated_mid_run_names_the_file_and_keeps_finished_chunks(
    ground_truth_recording, tmp_path
):
    import probeinterface as pi

    recording, _ = ground_truth_recording
    path = tmp_path / "rec.raw"
    recording.get_traces().astype(np.float32).tofile(path)
    probe = tmp_path / "probe.json"
    pi.write_probeinterface(probe, recording.get_probe())
    opened, _ = open_recording(
        path, probe=str(probe), sampling_frequency=30_000, num_channels=64, dtype="float32"
    )
    out = tmp_path / "out"
    with pytest.raises(LocsortError) as error:
        locsort.run(
            opened, out, PARAMS, progress=False, runner=TruncateDuringMainPass(path, after=5)
        )
    message = str(error.value)
    assert "rec.raw" in message and "samples" in message and "run the same command again" in message
    assert _finished_chunks(out) >= 5
    assert not out.exists()


def test_full_disk_leaves_no_output_and_the_run_then_completes(
    recording_folder, reference, tmp_path
):
    out = tmp_path / "out"
    # bytes per file: the 450 kB encoder file cannot be written (EFBIG, as on a full disk)
    limit = 300_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = _cli(
        "run",
        str(recording_folder),
        "--out",
        str(out),
        "--quiet",
        *PARAM_ARGS,
        preexec_fn=small_files,
    )
    assert full.returncode == 1
    lines = [line for line in full.stderr.splitlines() if line.startswith("locsort:")]
    assert lines and "no space left" in lines[-1], full.stderr
    assert "Traceback" not in full.stderr
    assert not out.exists()

    again = _cli("run", str(recording_folder), "--out", str(out), "--quiet", *PARAM_ARGS)
    assert again.returncode == 0, again.stderr
    assert_same_spikes(np.load(out / "spikes.npy"), reference.spikes)


def test_several_recordings_one_failing(ground_truth_recording, tmp_path):
    recording, _ = ground_truth_recording
    short = recording.frame_slice(0, 120_000)  # 4 s
    first = short.save(folder=tmp_path / "session_a", progress_bar=False)
    first.save(folder=tmp_path / "session_b", progress_bar=False)
    missing = tmp_path / "session_c.nwb"
    result = _cli(
        "run",
        str(tmp_path / "session_*"),
        str(missing),
        "--out",
        str(tmp_path / "sorted"),
        "--quiet",
    )
    assert result.returncode == 1
    assert "2 of 3 recordings sorted" in result.stdout
    assert "session_c.nwb" in result.stdout and "failed" in result.stdout
    for name in ("session_a", "session_b"):
        assert (tmp_path / "sorted" / name / "run.json").exists()
    assert not (tmp_path / "sorted" / "session_c").exists()


def test_work_area_starts_afresh_for_another_run_and_is_exclusive(tmp_path):
    out = tmp_path / "out"
    with WorkArea(out, {"params": 1}, num_chunks=4) as work:
        work.save_chunk(0, {"x": np.arange(3)})
        work.save_chunk(2, {"x": np.arange(2)})
        with pytest.raises(LocsortError, match="another locsort run"):
            WorkArea(out, {"params": 1}, num_chunks=4).__enter__()
    with WorkArea(out, {"params": 1}, num_chunks=4) as work:  # the same run: both chunks kept
        assert work.finished() == {0, 2} and work.resumed == 2
        assert np.array_equal(work.load_chunk(2)["x"], np.arange(2))
    with WorkArea(out, {"params": 2}, num_chunks=4) as work:  # other parameters: nothing reused
        assert work.finished() == set()


def test_chunk_threads_run_each_library_at_one_thread_and_the_pools_are_put_back():
    """Chunk threads that each used torch's and BLAS's pools on every core would contend with
    each other and with any other process: while chunks run, each pool has one thread, and its
    size is restored after."""
    import torch
    from threadpoolctl import threadpool_info

    def job(chunk):
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return torch.get_num_threads(), blas

    before = torch.get_num_threads()
    for threads in (1, 2):
        seen = dict(LocalRunner(threads).map(job, list(range(4)), list(range(4)), progress=False))
        assert len(seen) == 4
        assert all(torch_threads == 1 and set(blas) <= {1} for torch_threads, blas in seen.values())
    assert torch.get_num_threads() == before


def test_the_default_thread_count_is_the_cores_this_process_may_use():
    """Not the machine's core count: a process pinned to one core (or given a CPU quota by its
    container) gets one chunk thread."""
    code = "\n".join(
        [
            "import os",
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})",
            "from locsort.runners import LocalRunner, available_cores, thread_budget",
            "print(available_cores(), LocalRunner().threads)",
            "with thread_budget(3) as n:",
            "    print(n, LocalRunner().threads)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "3", "3"]


def test_results_do_not_depend_on_the_number_of_cores(ground_truth_recording):
    """The same sort with one core and with two: the same spikes, units and locations."""
    import torch

    recording, _ = ground_truth_recording
    before = torch.get_num_threads()
    spikes = {}
    for n_jobs in (1, 2):
        params = params_with(n_jobs=n_jobs, neural_epochs=8, encoder_max_epochs=10)
        spikes[n_jobs] = locsort.localize(recording, params=params, progress=False)
        sorting = locsort.sort(recording, params=params, progress=False)
        spikes[n_jobs, "sorted"] = sorting.to_spike_vector()
    assert spikes[1].tobytes() == spikes[2].tobytes()
    assert spikes[1, "sorted"].tobytes() == spikes[2, "sorted"].tobytes()
    assert torch.get_num_threads() == before
