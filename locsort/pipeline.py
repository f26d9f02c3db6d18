"""The pipeline, stage by stage, and the public API (``detect``, ``localize``, ``sort``,
``run``) that the CLI, the SpikeInterface plug-ins and the tests share.

    1. prepare           prepare.py          preprocess, noise, neighbourhoods, detection signal
    2. training sample   sample.py           a bounded sample of spikes spread over the recording
    3. fit localizer     localize/fit.py     the amortized encoder (or centre of mass)
    3b. motion           motion.py           drift from every spike's posterior depth; the
                                             recording registered, stages 2-3 drawn again
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .chunks import make_chunks
from .errors import UsageError
from .io import check_output_folder
from .localize import make_localizer
from . import motion as motion_stage
from .localize.fit import fit_localizer, refined_localizer
from .mainpass import main_pass
from .models import Models
from .nwb import check_nwb_path
from .motion import MOTION_MODES, MotionInfo
from .output import RunResult, sorting_from_spikes, write_run
from .params import Params, resolve_device
from .prepare import Prepared, Timer, prepare
from .runners import open_runner, thread_budget
from .sample import chunks_before, denoised_sample, training_sample
from .scan import SpikeBatch, scan
from .sort.cluster import fit_waveform_basis
from .sort.initial import cluster_spikes
from .sort.labels import labels_from_sorting
from .sort.postprocess import (
    collision_units,
    drop_border_duplicates,
    merge_motion_pieces,
    on_one_shank,
    without_copies,
)
from .sort.training import adapted_backbone, configured_backbone, self_trained, train_network
from .spikes import PEAK_DTYPE, check_peaks
from .workarea import WorkArea, digest, recording_identity

SORTERS = ("neural", "cluster")


@dataclass
class Located:
    """Stages 2-3: the training sample and the localizer and waveform basis fitted on it.

    sample : the training sample (with the neural sorter's windows for a sort)
    unlabelled : with few labels, a sample of the whole recording (None otherwise)
    localizer, basis : the fitted localizer and (T, P) temporal PCs of centre-channel waveforms
    amplitudes : how the sample's amplitudes were read
    """

    sample: object
    unlabelled: object
    localizer: object
    basis: np.ndarray
    amplitudes: object

    @property
    def fitted_on(self):
        return self.unlabelled if self.unlabelled is not None else self.sample


def fit_locations(
    prep: Prepared,
    peaks,
    progress: bool,
    *,
    runner=None,
    localizer=None,
    labels=None,
    neural: bool = False,
    denoise: bool = True,
) -> Located:
    """Stages 2-3 on a bounded training sample. ``labels``: sort/labels.Labels; ``neural``:
    keep the neural sorter's windows; ``denoise``: read amplitudes with a fitted denoiser."""
    params = prep.params
    if localizer is None:
        localizer = make_localizer(params.constants.localization_method, params)
    chunks = chunks_before(prep, labels.end) if labels is not None else None
    few_labels = labels is not None and params.label_max_spikes_per_unit is not None
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
        basis = fit_waveform_basis(fit_on.centre_waveforms, params.constants.waveform_pcs)
    return Located(sample, unlabelled, localizer, basis, reader)


def fit_units(
    prep: Prepared,
    located: Located,
    progress: bool,
    *,
    runner=None,
    labels=None,
    label_source: str = "",
) -> Models:
    """Stages 4-5: the neural sorter trained on the sample's clustering ("clustering") or on
    ``labels`` ("labels"); only the localizer for ``label_source`` ""."""
    params = prep.params
    models = Models(
        located.localizer,
        located.basis,
        notes=list(labels.notes) if labels is not None else [],
        label_source=label_source,
        amplitudes=located.amplitudes,
    )
    if not label_source:
        return models
    few_labels = located.unlabelled is not None
    sample, unlabelled, localizer = located.sample, located.unlabelled, located.localizer
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
    if located.fitted_on.neighbourhood_waveforms is not None:
        with prep.timer.stage("fit"):
            models.localizer, models.amplitudes = refined_localizer(
                prep, localizer, located.fitted_on, progress, runner
            )
    return models


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
    """Stages 2-5 on the recording as it is (no motion correction): the localizer, the waveform
    basis and, for ``label_source`` "clustering" or "labels", the neural sorter. ``labels``:
    sort/labels.Labels (``label_source`` "labels"); ``denoise``: read amplitudes with a fitted
    denoiser."""
    located = fit_locations(
        prep,
        peaks,
        progress,
        runner=runner,
        localizer=localizer,
        labels=labels,
        neural=bool(label_source),
        denoise=denoise,
    )
    return fit_units(
        prep, located, progress, runner=runner, labels=labels, label_source=label_source
    )


def register(
    prep: Prepared, located: Located, progress: bool, runner=None
) -> tuple[Prepared, object, MotionInfo]:
    """Stage 3b: (prep registered, SpikeInterface Motion, MotionInfo) for ``params.motion``
    "auto", "rigid" or "nonrigid", from the spikes of a pass over the recording localized with
    ``located``'s localizer ("auto" first screens ``located``'s sample for drift). ``prep``
    itself and no Motion when the motion is not corrected (MotionInfo says why)."""
    params, constants = prep.params, prep.params.constants
    mode, recording = params.motion, prep.recording
    info = MotionInfo(mode)
    if mode is None:
        return prep, None, info
    rigid, info.note = motion_stage.plan(recording, mode, constants)
    if rigid is None:
        return prep, None, info
    device = resolve_device(params.device)
    with prep.timer.stage("motion"):
        if mode == "auto":
            sample = located.fitted_on
            location = located.localizer.transform(sample.observations, prep.neighbourhood)
            largest = motion_stage.screen(
                recording,
                sample.peaks,
                np.asarray(location["y"], float),
                prep.counts.chunk_size,
                constants,
                device,
            )
            if largest is None or largest < constants.motion_min_um:
                info.note = _joined(
                    info.note,
                    f"no drift found: the largest displacement on the training sample is "
                    f"{largest:.1f} µm (below {constants.motion_min_um:g} µm); not corrected"
                    if largest is not None
                    else "motion not estimated: the recording is too short to follow drift "
                    f"(fewer than {constants.motion_screen_min_chunks} chunks)",
                )
                return prep, None, info
    spikes = motion_spikes(prep, located, progress, runner)
    with prep.timer.stage("motion"):
        too_few = motion_stage.too_few_spikes(recording, spikes, constants)
        if too_few:
            info.note = _joined(info.note, too_few)
            return prep, None, info
        motion = motion_stage.estimate(
            recording, spikes, spikes["y"].astype(float), rigid, constants, device
        )
        info.applied, info.method, info.rigid = True, motion_stage.METHOD, rigid
        info.max_um, info.rms_um = motion_stage.summary(motion)
    return motion_stage.with_registered(prep, motion, prep.timer), motion, info


def motion_spikes(prep: Prepared, located: Located, progress: bool, runner=None) -> np.ndarray:
    """Every spike of the recording as recorded, localized with ``located``'s localizer: what
    the motion is estimated from (one pass, timed as "motion")."""
    models = Models(located.localizer, amplitudes=located.amplitudes)
    spikes, _ = main_pass(prep, models, None, progress, runner, keep_pcs=False, stage="motion")
    return spikes


def registered_with_saved(prep: Prepared) -> tuple[Prepared, object, MotionInfo]:
    """Stage 3b with ``params.motion`` a saved motion folder: (prep registered, Motion,
    MotionInfo)."""
    folder = prep.params.motion
    motion = motion_stage.load(folder, prep.recording)
    info = MotionInfo(folder, True, f"loaded from {folder}")
    info.max_um, info.rms_um = motion_stage.summary(motion)
    return motion_stage.with_registered(prep, motion, prep.timer), motion, info


def _joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def sort_spikes(
    prep: Prepared, progress: bool, labels=None, runner=None, work=None
) -> tuple[np.ndarray, Models, Prepared]:
    """Spike records with locations and units, the models that made them and ``prep`` as the
    main pass read it (registered when the motion was corrected).

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
            prep, models = _resumed(prep, work)
        else:
            label_set = (
                labels_from_sorting(labels, prep.recording, params.label_max_spikes_per_unit or 0)
                if labels is not None
                else None
            )
            source = "labels" if labels is not None else "clustering"
            source = source if constants.sorter == "neural" else ""
            prep, located, motion, motion_info = _located(prep, progress, runner, label_set)
            models = fit_units(
                prep, located, progress, runner=runner, labels=label_set, label_source=source
            )
            models.motion, models.motion_info = motion, motion_info
            if work is not None:
                models.save(work.clear_models())
                models = Models.load(work.models_dir, prep)
        spikes, pcs = main_pass(
            prep, models, None, progress, runner, work, keep_pcs=models.neural is None
        )
        if models.motion is not None:
            spikes["y_registered"] = spikes["y"]
            spikes["y"] = motion_stage.recorded_depths(spikes, models.motion, prep.recording)
        if models.neural is None:
            spikes["unit_index"] = cluster_spikes(
                prep, spikes["x"], spikes["y_registered"], spikes["amplitude"], pcs
            )
        else:
            spikes["unit_index"] = drop_border_duplicates(
                spikes["segment_index"],
                spikes["sample_index"],
                spikes["unit_index"],
                prep.counts.refractory,
            )
        if models.motion is not None and models.label_source != "labels":
            spikes["unit_index"] = merge_motion_pieces(
                spikes["unit_index"],
                spikes["x"],
                spikes["y_registered"],
                spikes["y"] - spikes["y_registered"],
                constants.motion_merge_max_um,
                constants.motion_merge_max_overlap,
                constants.cluster_min_size,
            )
        spikes["unit_index"] = on_one_shank(
            _without_copies(prep, spikes, models),
            prep.neighbourhood.shank_ids[spikes["channel_index"]],
        )
        spikes["unit_index"] = _without_collisions(prep, spikes, models)
        return spikes, models, prep


def _located(
    prep: Prepared, progress: bool, runner, labels
) -> tuple[Prepared, Located, object, MotionInfo]:
    """Stages 2-3b of a sort: (prep, registered when the motion is corrected; stages 2-3 on it;
    the Motion or None; MotionInfo)."""
    neural = prep.params.constants.sorter == "neural"

    def locations(prep: Prepared, localizer=None) -> Located:
        # every spike is clustered on locations read without a denoiser (refined_localizer)
        return fit_locations(
            prep,
            None,
            progress,
            runner=runner,
            localizer=localizer,
            labels=labels,
            neural=neural,
            denoise=neural,
        )

    if prep.params.motion is not None and prep.params.motion not in MOTION_MODES:
        prep, motion, info = registered_with_saved(prep)
        return prep, locations(prep), motion, info
    located = locations(prep)
    prep, motion, info = register(prep, located, progress, runner)
    if motion is not None:  # the same localizer reads the registered traces
        located = locations(prep, located.localizer)
    return prep, located, motion, info


def _resumed(prep: Prepared, work) -> tuple[Prepared, Models]:
    """(prep registered as the interrupted run registered it, the models it kept)."""
    motion = Models.saved_motion(work.models_dir)
    if motion is not None:
        prep = motion_stage.with_registered(prep, motion, prep.timer)
    return prep, Models.load(work.models_dir, prep)


def _without_copies(prep: Prepared, spikes: np.ndarray, models: Models) -> np.ndarray:
    """(n,) units with -1, after a neural sort, for spikes at one fixed lag from a larger unit's
    (the same spikes detected again on far channels), then for units that repeat a larger
    unit's spikes (postprocess.without_copies). A user's units are kept as given."""
    constants, recording = prep.params.constants, prep.recording
    return without_copies(
        spikes["segment_index"],
        spikes["sample_index"],
        spikes["unit_index"],
        spikes["amplitude"],
        recording.get_sampling_frequency(),
        recording.get_total_samples(),
        copy_max_lag_ms=constants.lagged_copy_max_lag_ms,
        copy_min_share=constants.lagged_copy_min_share if models.neural is not None else 1.0,
        duplicate_max_lag_ms=constants.duplicate_unit_max_lag_ms,
        duplicate_min_shared=(
            constants.duplicate_unit_min_shared if models.label_source != "labels" else 1.0
        ),
    )


def _without_collisions(prep: Prepared, spikes: np.ndarray, models: Models) -> np.ndarray:
    """(n,) units with -1 for units made of two neighbours' overlapping spikes
    (postprocess.collision_units). A user's units are kept as given."""
    constants, recording = prep.params.constants, prep.recording
    units = spikes["unit_index"].copy()
    removed = collision_units(
        spikes["segment_index"],
        spikes["sample_index"],
        units,
        spikes["x"],
        spikes["y_registered"],
        recording.get_sampling_frequency(),
        recording.get_total_samples(),
        window_ms=constants.collision_window_ms,
        radius_um=constants.peel_radius_um,  # units whose spikes' footprints overlap
        min_excess=constants.collision_min_excess if models.label_source != "labels" else 1.0,
    )
    units[np.isin(units, removed)] = -1
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
            spikes, _, prep = sort_spikes(prep, progress, labels, runner)
    return sorting_from_spikes(spikes, prep.recording)


def run(
    recording,
    out: str | Path,
    params: Params | dict | None = None,
    *,
    ground_truth=None,
    overwrite: bool = False,
    phy: bool = False,
    nwb: str | Path | None = None,
    progress: bool = True,
    source: str | None = None,
    command: list[str] | None = None,
    labels=None,
    workers: int | None = None,
    scheduler: str | None = None,
    connect_timeout: float = 20.0,
    runner=None,
) -> RunResult:
    """The whole pipeline; writes ``out`` (spikes.npy, sorting/, analyzer/, units.tsv,
    report.html, run.json, encoder.safetensors, neural_sorter.safetensors[, motion/][, phy/])
    and, with ``nwb`` (a path), the units as an NWB file. ``labels``, ``workers``,
    ``scheduler``: as for ``sort``; ``runner``: an open ``runners`` runner to use instead (one
    Dask cluster for several recordings).

    ``out`` appears only when complete (built under a temporary name, then renamed). Until
    then the run keeps its trained models and finished chunks in a work area beside ``out``
    (locsort.workarea): the same call after an interruption continues from there and gives
    the same result; ``overwrite`` starts afresh."""
    from . import __version__

    params = as_params(params)
    out = check_output_folder(out, overwrite)  # fail before any computation
    if phy and recording.get_num_segments() > 1:
        raise UsageError(
            f"Phy reads one segment and this recording has {recording.get_num_segments()}: "
            "drop --phy, or sort the segments one by one"
        )
    if nwb is not None:
        nwb = check_nwb_path(nwb, overwrite)
        if not params.analyzer:
            raise UsageError(
                "--nwb writes the analyzer's mean waveforms and quality metrics: "
                "it cannot be combined with analyzer=False"
            )
    with thread_budget(params.n_jobs):
        timer = Timer()
        started = time.time()
        prep = prepare(recording, params, timer)
        identity = {
            "locsort": __version__,
            "recording": recording_identity(prep.recording),
            # neither changes the models or the chunks' spikes
            "params": {k: v for k, v in params.asdict().items() if k not in ("n_jobs", "analyzer")},
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
            spikes, models, prep = sort_spikes(prep, progress, labels, runner, work)
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
                nwb=nwb,
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
