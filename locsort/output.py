"""Stage 7: the output folder, written under a temporary name and renamed when complete:
spikes.npy, sorting/, the trained models, motion/ (when the motion was corrected), analyzer/
and units.tsv (locsort.curate; unless ``params.analyzer`` is False), run.json, report.html
and, on request, phy/ and an NWB file of the units (locsort.nwb, beside or anywhere)."""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import curate
from .evaluate import detected_localization_errors, sorting_accuracy
from .io import atomic_folder, save_npy_atomic
from .models import Models, json_default
from .nwb import write_nwb
from .prepare import Prepared, Timer
from .report import write_report
from .runners import chunk_threads


@dataclass
class RunResult:
    out: Path
    spikes: np.ndarray
    sorting: object
    timings: dict
    evaluation: dict | None
    note: str | None = None  # what the user should know, e.g. why localization fell back


def sorting_from_spikes(spikes: np.ndarray, recording):
    """A SpikeInterface sorting of the spikes that have a unit (unit ids: their
    ``unit_index``), with each unit's position (x, registered y, z; µm) as the unit property
    ``location``."""
    from spikeinterface.core import NumpySorting

    assigned = spikes[spikes["unit_index"] >= 0]
    samples, labels = [], []
    for segment in range(recording.get_num_segments()):
        s = assigned[assigned["segment_index"] == segment]
        order = np.argsort(s["sample_index"], kind="stable")
        samples.append(s["sample_index"][order].astype(np.int64))
        labels.append(s["unit_index"][order].astype(np.int64))
    unit_ids = np.unique(assigned["unit_index"]).astype(np.int64)
    sorting = NumpySorting.from_samples_and_labels(
        samples, labels, recording.get_sampling_frequency(), unit_ids=unit_ids
    )
    sorting.set_property("location", curate.unit_positions(spikes, unit_ids))
    return sorting


def save_sorting(sorting, folder: Path) -> None:
    """``sorting`` (in memory, from ``sorting_from_spikes``) saved as a SpikeInterface folder,
    without SpikeInterface's warning that an in-memory sorting has no provenance to save: a
    run's provenance is its run.json (or run_sorter's own log)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The extractor is not serializable to file")
        sorting.save(folder=folder)


def write_run(
    out: Path,
    overwrite: bool,
    prep: Prepared,
    spikes,
    models: Models,
    timer: Timer,
    started: float,
    *,
    ground_truth,
    phy: bool,
    nwb: Path | None = None,
    source,
    command,
    execution: dict,
) -> RunResult:
    """Evaluate (with ground truth) and write the output folder in one rename."""
    from . import __version__

    params, localizer = prep.params, models.localizer
    sorting = sorting_from_spikes(spikes, prep.recording)
    evaluation = None
    if ground_truth is not None:
        with timer.stage("evaluate"):
            evaluation = {
                "localization": detected_localization_errors(spikes, prep.recording, ground_truth),
                "sorting": sorting_accuracy(sorting, ground_truth),
            }
    localization = {
        "method": params.constants.localization_method,
        "fallback": getattr(localizer, "fallback_reason", "") or None,
        "training": getattr(localizer, "history", None) or None,
    }
    sorter = {
        "sorter": params.constants.sorter,
        "labels": models.label_source or None,
        "notes": models.notes,
        "neural_training": models.neural.history if models.neural is not None else None,
    }
    notes = [
        *prep.notes,
        *([localization["fallback"]] if localization["fallback"] else []),
        *models.notes,
    ]
    if models.motion_info.note:
        notes.append(models.motion_info.note)
    if prep.bad_channels:
        notes.insert(
            0,
            "channels interpolated from their neighbours: "
            + ", ".join(f"{channel} ({why})" for channel, why in prep.bad_channels.items()),
        )
    resumed = execution["resumed"]
    if resumed["models"] or resumed["chunks"]:
        notes.append(
            f"continued an interrupted run ({resumed['chunks']} of "
            f"{resumed['of_chunks']} chunks were already done)"
        )
    if phy and len(sorting.unit_ids) == 0:
        notes.append("no units were found, so no Phy folder was written")
        phy = False
    with atomic_folder(out, overwrite) as tmp:
        analyzer = units = None
        if params.analyzer:
            with timer.stage("analyzer"):
                analyzer = curate.build_analyzer(
                    prep.recording,
                    sorting,
                    spikes,
                    prep.noise,
                    tmp / "analyzer",
                    params.constants,
                    seed=params.seed,
                    n_jobs=chunk_threads(),
                )
                units = curate.units_table(analyzer, spikes, params.constants)
                curate.write_units(units, tmp / "units.tsv")
            sorting.set_property("quality", units["quality"].to_numpy().astype(str))
        with timer.stage("write"):
            save_npy_atomic(tmp / "spikes.npy", spikes)
            save_sorting(sorting, tmp / "sorting")
            if getattr(localizer, "net", None) is not None:  # reusable on the same probe type
                localizer.save(tmp / "encoder.safetensors")
            if models.neural is not None:
                models.neural.save(tmp / "neural_sorter.safetensors")
            if models.motion is not None:
                models.motion.save(tmp / "motion")
            if phy:
                export_phy(prep.recording, sorting, tmp / "phy", analyzer, units)
        with timer.stage("report"):
            write_report(
                tmp,
                recording=prep.recording,
                spikes=spikes,
                sorting=sorting,
                title=f"locsort: {source or 'recording'}",
                timings=dict(timer),
                evaluation=evaluation,
                ground_truth=ground_truth,
                params=params.asdict(),
                seed=params.seed,
                run_notes=notes,
                motion=models.motion,
                analyzer=analyzer,
                units=units,
            )
        if nwb is not None:
            with timer.stage("write"):
                write_nwb(
                    nwb,
                    recording=prep.recording,
                    sorting=sorting,
                    units=units,
                    analyzer=analyzer,
                    spikes=spikes,
                    description=f"locsort {__version__}: {source or 'recording'}",
                    shanks=prep.neighbourhood.shank_ids,
                )
        recording = prep.recording
        info = {
            "locsort_version": __version__,
            "command": command if command is not None else sys.argv,
            "source": source,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "params": params.asdict(),
            "timings_s": dict(timer),
            "recording": {
                "num_channels": int(recording.get_num_channels()),
                "sampling_frequency": float(recording.get_sampling_frequency()),
                "num_segments": int(recording.get_num_segments()),
                "duration_s": float(
                    sum(recording.get_duration(s) for s in range(recording.get_num_segments()))
                ),
                "num_shanks": int(len(np.unique(prep.neighbourhood.shank_ids))),
                "notes": prep.notes,
            },
            "bad_channels": {str(channel): why for channel, why in prep.bad_channels.items()},
            "detection": prep.detection,
            "amplitudes": models.amplitudes.description,
            "num_spikes": int(len(spikes)),
            "num_units": int(len(sorting.unit_ids)),
            "localization": localization,
            "motion": models.motion_info.asdict(),
            "sorting": sorter,
            "execution": execution,
            "evaluation": evaluation,
            "versions": versions(),
        }
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=json_default))
    return RunResult(out, spikes, sorting, dict(timer), evaluation, "; ".join(notes) or None)


def export_phy(recording, sorting, folder: Path, analyzer=None, units=None) -> None:
    """A Phy folder (SpikeInterface's exporter) of ``sorting`` on ``recording``, from the run's
    ``analyzer`` when there is one (its amplitudes and metrics), labelled by ``units``."""
    from spikeinterface.core import create_sorting_analyzer
    from spikeinterface.exporters import export_to_phy

    if analyzer is None:
        analyzer = create_sorting_analyzer(sorting, recording, sparse=True, format="memory")
        analyzer.compute(["random_spikes", "templates"], verbose=False)
    export_to_phy(
        analyzer,
        folder,
        compute_pc_features=False,
        compute_amplitudes=True,
        copy_binary=True,
        verbose=False,
        n_jobs=chunk_threads(),
        pool_engine="thread",
    )
    if units is not None:
        curate.label_phy(folder, units)


def versions() -> dict:
    import spikeinterface
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "spikeinterface": spikeinterface.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
