"""Stage 6: the main pass, one read of every chunk: detect (or take the caller's peaks),
localize with the trained localizer and, with a trained neural sorter, assign units
(sort/assign.py). Chunks run on a runner (threads or Dask) and, with a work area, each finished
chunk is kept so that an interrupted run continues where it stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import LocsortError
from .models import Models
from .prepare import Prepared
from .runners import LocalRunner
from .scan import Scanner, concatenate_parts
from .sort.assign import Assigner
from .sort.cluster import waveform_pcs
from .sort.peel import Significance
from .spikes import LOCATION_FIELDS, PEAK_DTYPE, spikes_from_peaks

STAGES = ("detect", "localize", "neural")


@dataclass
class ChunkJob:
    """The main pass over one chunk. Picklable: Dask sends it to each worker once (the
    recording as its description, the models as weights). Returns per-spike arrays and
    ``seconds``: [reading + detection + features (peeling's detection too), localization,
    neural sorter (+ peeling's subtraction)].

    basis : (T, P) temporal PCs of centre-channel waveforms, for ``keep_pcs``
    assigner : sort/assign.Assigner of the trained network (None: no units)
    keep_pcs : each spike's centre-channel PCs (the clustering sorter clusters on them)
    """

    scanner: Scanner
    localizer: object
    basis: np.ndarray | None
    assigner: Assigner | None = None
    keep_pcs: bool = True

    def __call__(self, chunk) -> dict:
        neighbourhood = self.scanner.neighbourhood
        start = time.perf_counter()
        batch = self.scanner.batch(chunk, waveforms=self.keep_pcs or self.assigner is not None)
        read = time.perf_counter()
        observations = self.localizer.observe(batch, neighbourhood)
        observed = time.perf_counter()
        peaks, units, detecting = batch.peaks, None, 0.0
        if self.assigner is not None:
            units, hidden, hidden_units, detecting = self.assigner(chunk, batch)
            if hidden is not None and len(hidden.centre):
                more = self.localizer.observe(hidden, neighbourhood)
                # one transform call for all (same batch shapes wherever the chunk runs)
                observations = {k: np.concatenate([observations[k], more[k]]) for k in observations}
                peaks = np.concatenate([peaks, hidden.peaks])
                units = np.concatenate([units, hidden_units])
        classified = time.perf_counter()
        location = self.localizer.transform(observations, neighbourhood)
        out = {"peaks": peaks, **{k: np.asarray(location[k], np.float32) for k in LOCATION_FIELDS}}
        if units is not None:
            out["unit_index"] = units
        if len(peaks) > len(batch.peaks):  # spikes found by peeling go in time order
            order = np.argsort(peaks["sample_index"], kind="stable")
            out = {k: v[order] for k, v in out.items()}
        if self.keep_pcs:
            out["pcs"] = waveform_pcs(
                batch.waveforms[:, :, 0], self.basis, self.scanner.params.constants.waveform_pcs
            )
        if batch.order is not None:
            out["order"] = batch.order
        located = time.perf_counter()
        out["seconds"] = np.array(
            [
                read - start + detecting,
                (observed - read) + (located - classified),
                classified - observed - detecting,
            ]
        )
        return out


def run_chunks(job, chunks: list, runner, work, desc: str, progress: bool) -> list[dict]:
    """``job`` over every chunk on ``runner``; each result is written to the work area as it
    arrives (if any), so that an interrupted run keeps it. Results in chunk order."""
    results: dict[int, dict] = {}
    done = work.finished() if work is not None else set()
    todo = [i for i in range(len(chunks)) if i not in done]
    try:
        for index, result in runner.map(job, chunks, todo, desc=desc, progress=progress):
            if work is not None:
                work.save_chunk(index, result)
            results[index] = result
    except LocsortError as exc:
        finished = len(work.finished()) if work is not None else 0
        if finished:
            raise LocsortError(
                f"{exc}. {finished} of {len(chunks)} chunks are finished and kept "
                f"in {work.path}: run the same command again to continue"
            ) from exc
        raise
    for index in done:
        loaded = work.load_chunk(index)
        if loaded is None:  # unreadable leftover: run that chunk again
            loaded = job(chunks[index])
            work.save_chunk(index, loaded)
        results[index] = loaded
    return [results[i] for i in range(len(chunks))]


def main_pass(
    prep: Prepared,
    models: Models,
    peaks,
    progress: bool,
    runner=None,
    work=None,
    keep_pcs: bool = True,
    stage: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One pass over every chunk (ChunkJob). Returns spike records (spikes.SPIKE_DTYPE, with
    ``unit_index`` when the models hold a neural sorter; ``y_registered`` is ``y``) and (n, P)
    centre-channel PCs (None without ``keep_pcs``). ``stage``: the timer stage the whole pass
    counts for (default: detect, localize and neural, each its share)."""
    constants, timer = prep.params.constants, prep.timer
    scanner = prep.scanner(peaks, models.amplitudes, last_pass=True)
    assigner = None
    if models.neural is not None:
        templates = models.templates if constants.neural_peel else None
        significance = None
        if templates is not None and (
            constants.neural_peel_min_z > 0 or constants.neural_min_z > 0
        ):
            significance = Significance.fit(
                templates, prep.noise_covariance, prep.noise_autocorrelation
            )
        assigner = Assigner(scanner, models.neural, prep.counts.refractory, templates, significance)
    job = ChunkJob(scanner, models.localizer, models.basis, assigner, keep_pcs)
    chunks = scanner.chunks()
    started = time.perf_counter()
    try:
        parts = run_chunks(
            job,
            chunks,
            runner or LocalRunner(prep.params.n_jobs),
            work,
            stage or ("detect + localize" if peaks is None else "localize"),
            progress,
        )
    finally:
        if prep.trace_cache is not None:
            prep.trace_cache.clear()
    seconds = np.sum([part.pop("seconds") for part in parts], axis=0) if parts else np.zeros(3)
    wall = time.perf_counter() - started
    if stage is not None:
        timer[stage] = timer.get(stage, 0.0) + wall
    else:  # shared between stages in proportion to their time in the chunks
        for name, spent in zip(STAGES, seconds):
            if name != "neural" or models.neural is not None:
                timer[name] = timer.get(name, 0.0) + float(spent * wall / max(seconds.sum(), 1e-9))
    found = concatenate_parts([p for p in parts if len(p["peaks"])], reorder=peaks is not None)
    if not found:
        pcs = np.zeros((0, constants.waveform_pcs), np.float32) if keep_pcs else None
        return spikes_from_peaks(np.zeros(0, PEAK_DTYPE)), pcs
    spikes = spikes_from_peaks(found["peaks"])
    for name in LOCATION_FIELDS + (("unit_index",) if models.neural is not None else ()):
        spikes[name] = found[name]
    spikes["y_registered"] = spikes["y"]
    return spikes, found["pcs"] if keep_pcs else None
