"""The public API: ``detect``, ``localize``, ``sort`` and ``run``, shared by the CLI, the
SpikeInterface plug-ins and the tests.

Data flow: recording -> preprocess -> (bounded training sample: fit waveform basis and
localizer) -> one pass over all chunks (detect, neighbourhood features, localize) -> cluster
-> sorting -> outputs.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LocsortError, UsageError
from .io import atomic_folder, check_output_folder, check_recording, save_npy_atomic
from .localize import make_localizer
from .neighbourhood import Neighbourhood
from .parallel import make_chunks, spread_chunks
from .params import Params, resolve_device
from .preprocess import noise_levels, preprocess
from .scan import Geometry, SpikeBatch, scan
from .sort.cluster import cluster, clustering_features
from .spikes import PEAK_DTYPE, check_peaks, spikes_from_peaks


class Timer(dict):
    """Wall time per stage, in seconds, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Prepared:
    """A recording made ready for every stage: preprocessed, noise measured, neighbourhood built."""

    recording: object
    params: Params
    noise: np.ndarray
    neighbourhood: Neighbourhood
    timer: Timer = field(default_factory=Timer)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_params(self.params, self.recording.get_sampling_frequency())


def prepare(recording, params: Params | None = None, timer: Timer | None = None) -> Prepared:
    params = params or Params()
    timer = timer if timer is not None else Timer()
    check_recording(recording)
    resolve_device(params.device)  # refuse --device cuda without a GPU before any work
    with timer.stage("preprocess"):
        processed = preprocess(recording, params)
        noise = noise_levels(processed, params)
        neighbourhood = Neighbourhood.from_recording(processed, params.neighbourhood_channels)
    return Prepared(processed, params, noise, neighbourhood, timer)


def _training_sample(prep: Prepared, localizer, peaks, progress: bool) -> tuple[dict, np.ndarray]:
    """What the localizer observes, and centre-channel waveforms, for spikes from chunks spread
    over the whole recording, at most ``max_training_spikes``: what learned stages fit on."""
    params = prep.params
    chunks = spread_chunks(make_chunks(prep.recording, prep.geometry.chunk_size), params.sample_chunks)
    cap = max(1, math.ceil(params.max_training_spikes / max(len(chunks), 1)))
    rng = np.random.default_rng(params.seed)

    def keep(batch: SpikeBatch) -> dict:
        n = len(batch.centre)
        pick = np.sort(rng.choice(n, size=min(n, cap), replace=False)) if n else np.zeros(0, int)
        batch = batch.subset(pick)
        return {"centre_waveforms": batch.waveforms[:, :, 0], **localizer.observe(batch, prep.neighbourhood)}

    found = scan(
        prep.recording, keep, params=params, neighbourhood=prep.neighbourhood, noise=prep.noise,
        peaks=peaks, chunks=chunks, progress=progress, desc="training sample",
    )
    if not found:
        empty = localizer.observe(_empty_batch(prep), prep.neighbourhood)
        return empty, np.zeros((0, prep.geometry.before + prep.geometry.after), np.float32)
    waveforms = found.pop("centre_waveforms")
    return found, waveforms


def fit_localizer(prep: Prepared, localizer, peaks, progress: bool) -> np.ndarray:
    """Train ``localizer`` on the bounded training sample or, for an encoder loaded from a file,
    adapt it to this recording (probe geometry checked, noise levels replaced). Returns the
    sample's centre-channel waveforms (for the waveform basis)."""
    sample, waveforms = _training_sample(prep, localizer, peaks, progress)
    if getattr(localizer, "net", None) is not None:
        localizer.use_recording(prep.neighbourhood, prep.noise)
    else:
        localizer.fit(sample, prep.neighbourhood, prep.noise, prep.params, progress=progress)
    return waveforms


def _empty_batch(prep: Prepared) -> SpikeBatch:
    geo, k = prep.geometry, prep.neighbourhood.size
    return SpikeBatch(np.zeros(0, PEAK_DTYPE), np.zeros(0, np.int64), np.zeros((0, geo.before + geo.after, k), np.float32),
                      np.zeros((0, k), np.float32))


def fit_waveform_basis(waveforms: np.ndarray, num_components: int) -> np.ndarray | None:
    """(T, P) temporal principal components of (n, T) centre-channel waveforms (None if too few)."""
    centre = waveforms.astype(np.float64)
    if len(centre) < max(num_components, 2):
        return None
    _, _, vt = np.linalg.svd(centre - centre.mean(0), full_matrices=False)
    return vt[:num_components].T.astype(np.float32)


def _locate(prep: Prepared, peaks, method: str, progress: bool, localizer=None):
    """Spike records with locations, (n, P) centre-channel waveform PCs for clustering, and the
    fitted localizer."""
    params = prep.params
    timer = prep.timer
    localizer = localizer if localizer is not None else make_localizer(method, params)
    with timer.stage("fit"):
        waveforms = fit_localizer(prep, localizer, peaks, progress)
        basis = fit_waveform_basis(waveforms, params.waveform_pcs)
    del waveforms
    num_pcs = params.waveform_pcs
    localize_seconds = 0.0

    def consume(batch: SpikeBatch) -> dict:
        nonlocal localize_seconds
        start = time.perf_counter()
        location = localizer.transform(localizer.observe(batch, prep.neighbourhood), prep.neighbourhood)
        localize_seconds += time.perf_counter() - start
        centre = batch.waveforms[:, :, 0]
        pcs = centre @ basis if basis is not None else np.zeros((len(centre), num_pcs), np.float32)
        out = {"peaks": batch.peaks, "pcs": pcs.astype(np.float32), **location}
        if batch.order is not None:
            out["order"] = batch.order
        return out

    scan_start = time.perf_counter()
    found = scan(
        prep.recording, consume, params=params, neighbourhood=prep.neighbourhood, noise=prep.noise,
        peaks=peaks, progress=progress, desc="detect + localize" if peaks is None else "localize",
    )
    scan_seconds = time.perf_counter() - scan_start
    timer["detect"] = timer.get("detect", 0.0) + scan_seconds - localize_seconds
    timer["localize"] = timer.get("localize", 0.0) + localize_seconds
    if not found:
        return spikes_from_peaks(np.zeros(0, PEAK_DTYPE)), np.zeros((0, num_pcs), np.float32), localizer
    spikes = spikes_from_peaks(found["peaks"])
    for name in ("x", "y", "z", "alpha", "x_std", "y_std", "z_std"):
        spikes[name] = found[name]
    return spikes, found["pcs"], localizer


def _as_params(params, **overrides) -> Params:
    if params is None:
        params = Params()
    elif isinstance(params, dict):
        params = Params.from_dict(params)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return params.replace(**overrides) if overrides else params


# --------------------------------------------------------------------------- public API


def detect(recording, params: Params | dict | None = None, progress: bool = True) -> np.ndarray:
    """Detected spikes as SpikeInterface peaks (sample_index, channel_index, amplitude, segment_index)."""
    prep = prepare(recording, _as_params(params))

    def keep(batch: SpikeBatch) -> dict:
        return {"peaks": batch.peaks}

    found = scan(prep.recording, keep, params=prep.params, neighbourhood=prep.neighbourhood, noise=prep.noise,
                 progress=progress, desc="detect", features=False)
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
    centred on its ``channel_index``.
    """
    params = _as_params(params, localization_method=method)
    prep = prepare(recording, params)
    if peaks is not None:
        peaks = _checked_peaks(prep.recording, peaks)
    spikes, _, _ = _locate(prep, peaks, params.localization_method, progress)
    return spikes


def _checked_peaks(recording, peaks):
    peaks = check_peaks(peaks, recording.get_num_channels(), recording.get_num_segments())
    for segment in range(recording.get_num_segments()):
        samples = peaks["sample_index"][peaks["segment_index"] == segment]
        n = recording.get_num_samples(segment)
        if len(samples) and (samples.min() < 0 or samples.max() >= n):
            raise UsageError(f"peaks in segment {segment} have sample_index outside 0..{n - 1}")
    return peaks


def _sort_spikes(prep: Prepared, spikes: np.ndarray, pcs: np.ndarray) -> np.ndarray:
    with prep.timer.stage("cluster"):
        features = clustering_features(spikes["x"], spikes["y"], spikes["amplitude"], pcs, prep.params)
        spikes["unit_index"] = cluster(features, prep.params)
    return spikes


def sorting_from_spikes(spikes: np.ndarray, recording):
    """A SpikeInterface sorting (unit ids 0..U-1) of the spikes that have a unit."""
    from spikeinterface.core import NumpySorting

    assigned = spikes[spikes["unit_index"] >= 0]
    samples, labels = [], []
    for segment in range(recording.get_num_segments()):
        s = assigned[assigned["segment_index"] == segment]
        order = np.argsort(s["sample_index"], kind="stable")
        samples.append(s["sample_index"][order].astype(np.int64))
        labels.append(s["unit_index"][order].astype(np.int64))
    unit_ids = np.unique(assigned["unit_index"]).astype(np.int64)
    return NumpySorting.from_samples_and_labels(samples, labels, recording.get_sampling_frequency(), unit_ids=unit_ids)


def sort(recording, params: Params | dict | None = None, progress: bool = True):
    """A SpikeInterface sorting of the recording (unit ids 0..U-1)."""
    prep = prepare(recording, _as_params(params))
    spikes, pcs, _ = _locate(prep, None, prep.params.localization_method, progress)
    spikes = _sort_spikes(prep, spikes, pcs)
    return sorting_from_spikes(spikes, prep.recording)


@dataclass
class RunResult:
    out: Path
    spikes: np.ndarray
    sorting: object
    timings: dict
    evaluation: dict | None
    note: str | None = None  # e.g. why the localizer fell back to centre of mass


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
) -> RunResult:
    """The whole pipeline; writes ``out`` (spikes.npy, sorting/, report.html, run.json[, phy/]).

    ``out`` appears only when complete (built under a temporary name, then renamed).
    """
    from . import __version__
    from .evaluate import detected_localization_errors, sorting_accuracy

    params = _as_params(params)
    out = check_output_folder(out, overwrite)  # fail before any computation
    timer = Timer()
    started = time.time()
    prep = prepare(recording, params, timer)
    spikes, pcs, localizer = _locate(prep, None, params.localization_method, progress)
    spikes = _sort_spikes(prep, spikes, pcs)
    sorting = sorting_from_spikes(spikes, prep.recording)
    evaluation = None
    if ground_truth is not None:
        with timer.stage("evaluate"):
            evaluation = {
                "localization": detected_localization_errors(spikes, prep.recording, ground_truth),
                "sorting": sorting_accuracy(sorting, ground_truth),
            }
    localization = {"method": params.localization_method, "fallback": getattr(localizer, "fallback_reason", "") or None,
                    "training": getattr(localizer, "history", None) or None}
    with atomic_folder(out, overwrite) as tmp:
        with timer.stage("write"):
            save_npy_atomic(tmp / "spikes.npy", spikes)
            sorting.save(folder=tmp / "sorting")
            if getattr(localizer, "net", None) is not None:  # reusable on recordings of the same probe type
                localizer.save(tmp / "encoder.safetensors")
            if phy:
                _export_phy(prep.recording, sorting, tmp / "phy")
        with timer.stage("report"):
            from .report import write_report

            write_report(
                tmp, recording=prep.recording, spikes=spikes, sorting=sorting, title=f"locsort: {source or 'recording'}",
                timings=dict(timer), evaluation=evaluation, ground_truth=ground_truth, params=params.asdict(), seed=params.seed,
            )
        info = {
            "locsort_version": __version__,
            "command": command if command is not None else sys.argv,
            "source": source,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "params": params.asdict(),
            "timings_s": dict(timer),
            "recording": {
                "num_channels": int(prep.recording.get_num_channels()),
                "sampling_frequency": float(prep.recording.get_sampling_frequency()),
                "num_segments": int(prep.recording.get_num_segments()),
                "duration_s": float(sum(prep.recording.get_duration(s) for s in range(prep.recording.get_num_segments()))),
            },
            "num_spikes": int(len(spikes)),
            "num_units": int(len(sorting.unit_ids)),
            "localization": localization,
            "evaluation": evaluation,
            "versions": _versions(),
        }
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return RunResult(out, spikes, sorting, dict(timer), evaluation, localization["fallback"])


def _export_phy(recording, sorting, folder: Path) -> None:
    from spikeinterface.core import create_sorting_analyzer
    from spikeinterface.exporters import export_to_phy

    if len(sorting.unit_ids) == 0:
        raise LocsortError("no units were found, so there is nothing to export to Phy")
    analyzer = create_sorting_analyzer(sorting, recording, sparse=True, format="memory")
    analyzer.compute(["random_spikes", "templates"], verbose=False)
    export_to_phy(analyzer, folder, compute_pc_features=False, compute_amplitudes=True, copy_binary=True, verbose=False)


def _versions() -> dict:
    import spikeinterface
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "spikeinterface": spikeinterface.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value)}")
