"""The pipeline, stage by stage, and the public API (``detect``, ``localize``, ``sort``,
``run``) that the CLI, the SpikeInterface plug-ins and the tests share.

    1. prepare           prepare.py          preprocess, noise, neighbourhoods, detection signal
    2. training sample   sample.py           a bounded sample of spikes spread over the recording
    3. fit localizer     localize/fit.py     the amortized encoder (or centre of mass)
    4. initial clusters  sort/initial.py     HDBSCAN, splits, merges, late copies, adoption
    5. train network     sort/training.py    the neural sorter (own clusters or a user's labels)
    6. main pass         mainpass.py         detect, localize, assign (sort/assign.py) per chunk
    7. write             output.py           spikes.npy, sorting/, models, run.json, report

Data flows one way: each stage returns plain arrays or fitted objects to the next.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .chunks import make_chunks
from .errors import UsageError
from .io import check_output_folder
from .localize import make_localizer
from .localize.fit import fit_localizer, refined_localizer
from .mainpass import main_pass
from .models import Models
from .output import RunResult, sorting_from_spikes, write_run
from .params import Params
from .prepare import Prepared, Timer, prepare
from .runners import open_runner, thread_budget
from .sample import chunks_before, denoised_sample, training_sample
from .scan import SpikeBatch, scan
from .sort.cluster import fit_waveform_basis
from .sort.initial import cluster_spikes
from .sort.labels import labels_from_sorting
from .sort.postprocess import drop_border_duplicates, duplicate_units, lagged_copy_spikes
from .sort.training import adapted_backbone, configured_backbone, self_trained, train_network
from .spikes import PEAK_DTYPE, check_peaks
from .workarea import WorkArea, digest, recording_identity

SORTERS = ("neural", "cluster")


def fit_models(
    prep: Prepared,
    peaks,
    progress: bool,
    *,
    runner=None,
    localizer=None,
    labels=None,
    label_source: str = "",
    denoise: bool = True,
) -> Models:
    """Stages 2-5 on a bounded training sample: the localizer, the waveform basis and, for
    ``label_source`` "clustering" or "labels", the neural sorter. ``labels``: sort/labels.Labels
    (``label_source`` "labels"); ``denoise``: read amplitudes with a fitted denoiser."""
    params = prep.params
    if localizer is None:
        localizer = make_localizer(params.constants.localization_method, params)
    models = Models(
        localizer, notes=list(labels.notes) if labels is not None else [], label_source=label_source
    )
    chunks = chunks_before(prep, labels.end) if labels is not None else None
    few_labels = label_source == "labels" and params.label_max_spikes_per_unit is not None
    neural = bool(label_source)
    # a sort fits its denoiser after clustering (refined_localizer), localization at once
    keep = denoise and prep.denoise
    with prep.timer.stage("fit"):
        if neural or not denoise:
            sample = training_sample(
                prep,
                localizer,
                peaks,
                progress,
                windows=neural,
                labels=labels,
                chunks=chunks,
                runner=runner,
                keep_neighbourhood=keep,
            )
            reader = prep.amplitudes
        else:
            sample, reader = denoised_sample(prep, localizer, peaks, progress, runner=runner)
        # few labels: the localizer and the waveform basis learn from a sample of the whole
        # recording rather than from the labels' short stretch
        unlabelled = (
            training_sample(
                prep,
                localizer,
                peaks,
                progress,
                windows=True,
                runner=runner,
                keep_neighbourhood=keep,
            )
            if few_labels
            else None
        )
        fit_on = unlabelled if unlabelled is not None else sample
        localizer = fit_localizer(prep, localizer, fit_on, progress)
        models.localizer = localizer
        models.basis = fit_waveform_basis(fit_on.centre_waveforms, params.constants.waveform_pcs)
        models.amplitudes = reader
    if not neural:
        return models
    backbone = (
        adapted_backbone(prep, unlabelled, localizer, models.basis, models.notes)
        if few_labels
        else configured_backbone(params)
    )
    models.neural, models.templates = train_network(
        prep,
        sample,
        localizer,
        models.basis,
        label_source,
        models.notes,
        backbone,
        few_labels=few_labels,
    )
    if models.neural is None:
        return models
    if few_labels:
        models.neural, models.templates = self_trained(
            prep, sample, unlabelled, models.neural, labels.end
        )
        models.notes.append(
            f"self-training: the neural sorter trained again on "
            f"{models.neural.history['train_windows']} spikes, the labelled ones "
            "plus its own labelling of a sample of the whole recording"
        )
    if labels is not None:
        models.notes.append(f"neural sorter trained on {labels.num_units} labelled units")
    if fit_on.neighbourhood_waveforms is not None:
        with prep.timer.stage("fit"):
            models.localizer, models.amplitudes = refined_localizer(
                prep, localizer, fit_on, progress, runner
            )
    return models


def sort_spikes(
    prep: Prepared, progress: bool, labels=None, runner=None, work=None
) -> tuple[np.ndarray, Models]:
    """Spike records with locations and units, and the models that made them.

    "neural" (``constants.sorter``): models fitted on a bounded training sample (the neural
    sorter on ``labels`` or on the sample's clustering), then one streaming pass assigns every
    spike. "cluster" (the benchmarks' baseline): one pass localizes every spike, then all are
    clustered. With a work area (``work``) the models are kept there once trained, and every
    finished chunk too; the main pass always uses the models read back from it, so that a
    resumed run and an uninterrupted one compute the same thing."""
    with thread_budget(prep.params.n_jobs):
        params, constants = prep.params, prep.params.constants
        if constants.sorter not in SORTERS:
            raise UsageError(f"unknown sorter {constants.sorter!r}: use neural or cluster")
        if labels is not None and constants.sorter != "neural":
            raise UsageError("labels train the neural sorter: use sorter=neural")
        if work is not None and work.has_models():
            models = Models.load(work.models_dir, prep)
        else:
            label_set = (
                labels_from_sorting(labels, prep.recording, params.label_max_spikes_per_unit or 0)
                if labels is not None
                else None
            )
            source = "labels" if labels is not None else "clustering"
            if constants.sorter != "neural":
                source = ""
            # every spike is clustered on locations read without a denoiser (refined_localizer)
            models = fit_models(
                prep,
                None,
                progress,
                runner=runner,
                labels=label_set,
                label_source=source,
                denoise=constants.sorter != "cluster",
            )
            if work is not None:
                models.save(work.clear_models())
                models = Models.load(work.models_dir, prep)
        spikes, pcs = main_pass(
            prep, models, None, progress, runner, work, keep_pcs=models.neural is None
        )
        if models.neural is None:
            spikes["unit_index"] = cluster_spikes(
                prep, spikes["x"], spikes["y"], spikes["amplitude"], pcs
            )
        else:
            spikes["unit_index"] = drop_border_duplicates(
                spikes["segment_index"],
                spikes["sample_index"],
                spikes["unit_index"],
                prep.counts.refractory,
            )
        spikes["unit_index"] = _without_copies(prep, spikes, models)
        return spikes, models


def _without_copies(prep: Prepared, spikes: np.ndarray, models: Models) -> np.ndarray:
    """(n,) units with -1 for units that repeat a larger unit's spikes and, after a neural sort,
    for spikes at one fixed lag from a larger unit's (the same spikes detected again on far
    channels). A user's units are kept as given."""
    constants, recording = prep.params.constants, prep.recording
    units = spikes["unit_index"].copy()
    if models.label_source != "labels" and constants.duplicate_unit_min_shared < 1.0:
        removed = duplicate_units(
            sorting_from_spikes(spikes, recording),
            constants.duplicate_unit_min_shared,
            constants.duplicate_unit_max_lag_ms,
        )
        units[np.isin(units, removed)] = -1
    if models.neural is not None:
        copies = lagged_copy_spikes(
            spikes["segment_index"],
            spikes["sample_index"],
            units,
            spikes["amplitude"],
            recording.get_sampling_frequency(),
            recording.get_total_samples(),
            constants.duplicate_unit_max_lag_ms,
            constants.lagged_copy_min_share,
        )
        units[copies] = -1
    return units


def locate(prep: Prepared, peaks, progress: bool, localizer=None) -> tuple[np.ndarray, object]:
    """Spike records with locations, and the fitted localizer."""
    with thread_budget(prep.params.n_jobs):
        models = fit_models(prep, peaks, progress, localizer=localizer)
        spikes, _ = main_pass(prep, models, peaks, progress, keep_pcs=False)
        return spikes, models.localizer


# --------------------------------------------------------------------------- public API


def detect(recording, params: Params | dict | None = None, progress: bool = True) -> np.ndarray:
    """Detected spikes as SpikeInterface peaks (sample_index, channel_index, amplitude,
    segment_index)."""
    params = as_params(params)

    def keep(batch: SpikeBatch) -> dict:
        return {"peaks": batch.peaks}

    with thread_budget(params.n_jobs):
        prep = prepare(recording, params)
        found = scan(
            prep.recording,
            keep,
            params=prep.params,
            neighbourhood=prep.neighbourhood,
            noise=prep.noise,
            matched_filter=prep.matched_filter,
            progress=progress,
            desc="detect",
            features=False,
        )
    return found["peaks"] if found else np.zeros(0, PEAK_DTYPE)


def localize(
    recording,
    peaks: np.ndarray | None = None,
    method: str | None = None,
    params: Params | dict | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Spike records (locsort.spikes.SPIKE_DTYPE) with locations.

    Without ``peaks`` spikes are detected first. Given ``peaks`` are honoured one to one and in
    order (e.g. ground-truth spike times on their largest channel); a peak's neighbourhood is
    centred on its ``channel_index``. ``method``: "locsort" (default) or "center_of_mass"."""
    params = as_params(params)
    if method is not None:
        params = params.replace(constants=params.constants.replace(localization_method=method))
    with thread_budget(params.n_jobs):
        prep = prepare(recording, params)
        if peaks is not None:
            peaks = _checked_peaks(prep.recording, peaks)
        spikes, _ = locate(prep, peaks, progress)
    return spikes


def sort(
    recording,
    params: Params | dict | None = None,
    progress: bool = True,
    labels=None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    connect_timeout: float = 20.0,
):
    """A SpikeInterface sorting of the recording (unit ids 0..U-1).

    ``labels``: a SpikeInterface sorting of (part of) this recording (ground truth, another
    sorter's output, a curated sorting) to train the neural sorter on instead of locsort's own
    clustering; ``params.label_max_spikes_per_unit`` keeps only the first K spikes per unit.
    ``workers``: run the chunk work on a local Dask cluster of that many processes;
    ``scheduler``: on the existing Dask cluster at that address. Results are the same either
    way."""
    params = as_params(params)
    with thread_budget(params.n_jobs):
        prep = prepare(recording, params)
        with open_runner(workers, scheduler, connect_timeout, params) as runner:
            spikes, _ = sort_spikes(prep, progress, labels, runner)
    return sorting_from_spikes(spikes, prep.recording)


def run(
    recording,
    out: str | Path,
    params: Params | dict | None = None,
    *,
    ground_truth=None,
    overwrite: bool = False,
    phy: bool = False,
    progress: bool = True,
    source: str | None = None,
    command: list[str] | None = None,
    labels=None,
    workers: int | None = None,
    scheduler: str | None = None,
    connect_timeout: float = 20.0,
    runner=None,
) -> RunResult:
    """The whole pipeline; writes ``out`` (spikes.npy, sorting/, report.html, run.json,
    encoder.safetensors, neural_sorter.safetensors[, phy/]). ``labels``, ``workers``,
    ``scheduler``: as for ``sort``; ``runner``: an open ``runners`` runner to use instead (one
    Dask cluster for several recordings).

    ``out`` appears only when complete (built under a temporary name, then renamed). Until
    then the run keeps its trained models and finished chunks in a work area beside ``out``
    (locsort.workarea): the same call after an interruption continues from there and gives
    the same result; ``overwrite`` starts afresh."""
    from . import __version__

    params = as_params(params)
    out = check_output_folder(out, overwrite)  # fail before any computation
    with thread_budget(params.n_jobs):
        timer = Timer()
        started = time.time()
        prep = prepare(recording, params, timer)
        identity = {
            "locsort": __version__,
            "recording": recording_identity(prep.recording),
            "params": {k: v for k, v in params.asdict().items() if k != "n_jobs"},  # no effect
            "labels": _labels_identity(labels),
        }
        num_chunks = len(make_chunks(prep.recording, prep.counts.chunk_size))
        runner_context = (
            contextlib.nullcontext(runner)
            if runner is not None
            else open_runner(workers, scheduler, connect_timeout, params)
        )
        with WorkArea(out, identity, num_chunks, overwrite) as work, runner_context as runner:
            resumed = {"models": work.has_models(), "chunks": work.resumed, "of_chunks": num_chunks}
            if progress and (resumed["models"] or resumed["chunks"]):
                tqdm.write(
                    f"locsort: continuing an interrupted run from {work.path} (trained "
                    f"models: {'kept' if resumed['models'] else 'to train'}; "
                    f"{resumed['chunks']} of {num_chunks} chunks done)",
                    file=sys.stderr,
                )
            spikes, models = sort_spikes(prep, progress, labels, runner, work)
            execution = {
                "runner": runner.description,
                "workers": runner.workers,
                "resumed": resumed,
            }
            result = write_run(
                out,
                overwrite,
                prep,
                spikes,
                models,
                timer,
                started,
                ground_truth=ground_truth,
                phy=phy,
                source=source,
                command=command,
                execution=execution,
            )
            work.remove()
        return result


def as_params(params) -> Params:
    """``params`` as Params: None (the defaults), a dict (Params.from_dict) or Params."""
    if params is None:
        return Params()
    if isinstance(params, dict):
        return Params.from_dict(params)
    return params


def _checked_peaks(recording, peaks):
    peaks = check_peaks(peaks, recording.get_num_channels(), recording.get_num_segments())
    for segment in range(recording.get_num_segments()):
        samples = peaks["sample_index"][peaks["segment_index"] == segment]
        n = recording.get_num_samples(segment)
        if len(samples) and (samples.min() < 0 or samples.max() >= n):
            raise UsageError(f"peaks in segment {segment} have sample_index outside 0..{n - 1}")
    return peaks


def _labels_identity(labels) -> str | None:
    if labels is None:
        return None
    return digest(
        {
            "fs": labels.get_sampling_frequency(),
            "units": [str(u) for u in labels.unit_ids],
            "spikes": labels.to_spike_vector(),
        }
    )
