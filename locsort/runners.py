"""Where chunk work runs: in this process, or on a Dask cluster (one started here with
``workers=N``, or an existing one at ``scheduler``).

Every runner yields ``(chunk index, result)`` as chunks finish. The caller writes each result
down and merges them in chunk order, so a result does not depend on where a chunk ran or in
what order. A job (see ``pipeline.ChunkJob``) is one picklable object: Dask sends it to every
worker once, with the recording inside it as SpikeInterface's description, so that workers read
the file themselves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import uuid
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .errors import LocsortError, UsageError

# a recording that cannot describe itself as a file (generated, in memory) still travels to
# workers as its pickled description when it is this small (a generator's templates and trains)
MAX_INLINE_RECORDING_BYTES = 100 * 2**20
# times a chunk whose task the Dask scheduler cancelled (not failed) is submitted again
MAX_CHUNK_RESUBMITS = 2


def available_cores() -> int:
    """The cores this process may use: its CPU affinity and its cgroup's CPU quota, not the
    machine's core count (a container or a batch job is often given fewer)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


# chunk threads of the run in progress (thread_budget); None outside a run
_budget: int | None = None


@contextlib.contextmanager
def one_library_thread():
    """torch's intra-op pool and the BLAS/OpenMP pools (threadpoolctl) at one thread each, then
    put back. The parallelism is across chunks: library pools on every core as well would spin
    against the chunk threads and against any other process (docs/design-decisions.md,
    § Execution), and one thread makes every result independent of the core count."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def thread_budget(n_jobs: int | None = None):
    """The run inside uses ``n_jobs`` cores (None: those available to the process): that many
    chunk threads, each library at one thread. Yields the number of chunk threads."""
    global _budget
    before = _budget
    _budget = n_jobs or available_cores()
    try:
        with one_library_thread():
            yield _budget
    finally:
        _budget = before


def chunk_threads() -> int:
    """The chunk threads of the run in progress (all available cores outside a run)."""
    return max(1, int(_budget or available_cores()))


class LocalRunner:
    """Chunks in this process, ``threads`` at a time (default: the run's ``n_jobs``, else one
    per available core), each library at one thread while they run.

    Threads pay off because reading and filtering (SpikeInterface, NumPy/SciPy) and torch
    release the GIL. At most ``threads + 1`` chunks are in flight, so memory stays a few
    chunks' worth."""

    workers = 1

    def __init__(self, threads: int | None = None):
        self.threads = max(1, int(threads or chunk_threads()))

    @property
    def description(self) -> str:
        return f"this process, {self.threads} thread{'s' if self.threads > 1 else ''}"

    def map(
        self, job, chunks: list, indices: list[int], desc: str = "chunks", progress: bool = True
    ) -> Iterator:
        bar = tqdm(total=len(indices), desc=desc, unit="chunk", disable=not progress, leave=False)
        if self.threads == 1:
            with one_library_thread():
                for i in indices:
                    yield i, job(chunks[i])
                    bar.update()
            bar.close()
            return
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        pending, todo = {}, iter(indices)
        with (
            ThreadPoolExecutor(self.threads, thread_name_prefix="locsort-chunk") as pool,
            one_library_thread(),
        ):
            try:
                while True:
                    while len(pending) <= self.threads:
                        i = next(todo, None)
                        if i is None:
                            break
                        pending[pool.submit(job, chunks[i])] = i
                    if not pending:
                        break
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = pending.pop(future)
                        yield i, future.result()
                        bar.update()
            finally:  # an error or an interruption: do not start the chunks still queued
                for future in pending:
                    future.cancel()
                bar.close()


class DaskRunner:
    """Chunks as tasks on a dask.distributed cluster. A worker that dies mid-chunk has its
    chunk re-run elsewhere (Dask's own retry; a chunk whose task the scheduler cancels instead is
    submitted again); a chunk that kills workers repeatedly fails the run."""

    def __init__(self, client, description: str):
        self.client = client
        self.description = description

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def map(
        self, job, chunks: list, indices: list[int], desc: str = "chunks", progress: bool = True
    ) -> Iterator:
        from distributed import as_completed
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        if not indices:
            return
        _check_shippable(job)
        try:
            [shared] = self.client.scatter([job], broadcast=True, hash=False)
        except Exception as exc:
            raise LocsortError(
                f"cannot send the work to the Dask cluster ({self.description}): {exc}"
            ) from exc
        token = uuid.uuid4().hex[:8]

        def submit(i: int, attempt: int):
            key = f"locsort-{desc.replace(' ', '-')}-{token}-{i}" + (
                f"-retry{attempt}" if attempt else ""
            )
            return self.client.submit(_run_job, shared, chunks[i], key=key)

        futures = {submit(i, 0): i for i in indices}
        attempts = dict.fromkeys(indices, 0)
        completed = as_completed(futures, loop=self.client.loop)
        try:
            for future in tqdm(
                completed,
                total=len(futures),
                desc=desc,
                unit="chunk",
                disable=not progress,
                leave=False,
            ):
                i = futures[future]
                try:
                    result = future.result()
                except FutureCancelledError as exc:
                    # the scheduler dropped the chunk's task while a killed worker's tasks were
                    # rescheduled ("already forgotten"): submit it again, a bounded number of times
                    if self.client.status != "running" or attempts[i] >= MAX_CHUNK_RESUBMITS:
                        raise LocsortError(
                            f"lost the Dask cluster ({self.description}) during the run: {exc}"
                        ) from exc
                    attempts[i] += 1
                    again = submit(i, attempts[i])
                    futures[again] = i
                    completed.add(again)
                    continue
                except KilledWorker as exc:
                    raise LocsortError(
                        f"chunk {i} killed Dask workers repeatedly ({exc}); is a worker short of "
                        "memory?"
                    ) from exc
                except LocsortError:
                    raise
                except Exception as exc:
                    if future.status == "error":
                        raise  # the chunk's own error (a bug): as in a single process
                    raise LocsortError(
                        f"lost the Dask cluster ({self.description}) during the run: {exc}"
                    ) from exc
                yield i, result
                future.release()
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
            shared.release()


def _run_job(job, chunk):
    with one_library_thread():  # in a Dask worker: the same budget as in a local run
        return job(chunk)


def _check_shippable(job) -> None:
    recording = job.scanner.recording
    if recording.check_serializability("pickle"):
        return
    if len(pickle.dumps(recording.to_dict(recursive=True))) > MAX_INLINE_RECORDING_BYTES:
        raise UsageError(
            "the recording exists only in this process's memory and is too large to send to Dask "
            "workers; save it first (recording.save(folder=...)) and sort the saved copy"
        )


@contextlib.contextmanager
def open_runner(
    workers: int | None = None, scheduler: str | None = None, timeout: float = 20.0, params=None
):
    """A runner for chunk work: in this process (default), a local Dask cluster of ``workers``
    processes, or the existing cluster at ``scheduler`` (address, e.g. tcp://host:8786)."""
    if workers is not None and scheduler is not None:
        raise UsageError(
            "give either --workers (start a local Dask cluster) or --scheduler (use an existing "
            "one), not both"
        )
    if workers is None and scheduler is None:
        yield LocalRunner(params.n_jobs if params is not None else None)
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout, set_as_default=False)
        except Exception as exc:  # OSError / TimeoutError from the connection attempts
            raise LocsortError(
                f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s ({exc})"
            ) from None
        try:
            yield DaskRunner(client, f"scheduler {scheduler}")
        finally:
            client.close()
        return
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    # one thread per worker process: the parallelism is across chunks (workers). Dask's nanny
    # limits OpenMP/MKL threads to 1 in each worker by setting them in *this* process's
    # environment: put it back at once, and torch's thread count here too
    import torch

    threads = torch.get_num_threads()
    environment = dict(os.environ)
    try:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    except Exception as exc:
        raise LocsortError(
            f"cannot start a local Dask cluster of {workers} workers: {exc}"
        ) from exc
    finally:
        _restore(environment, threads)
    client = Client(cluster, set_as_default=False)
    try:
        yield DaskRunner(client, f"local cluster of {workers} workers")
    finally:
        client.close()
        cluster.close()
        _restore(environment, threads)


def _restore(environment: dict, torch_threads: int) -> None:
    import torch

    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(torch_threads)
