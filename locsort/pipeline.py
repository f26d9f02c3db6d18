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
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import LocsortError, UsageError
from .io import atomic_folder, check_output_folder, check_recording, save_npy_atomic, write_atomic
from .localize import make_localizer
from .localize.baseline import CenterOfMass
from .neighbourhood import (
    AmplitudeReader,
    Neighbourhood,
    fit_amplitude_basis,
    fit_amplitude_denoiser,
    gather_windows,
)
from .detect import fit_matched_filter, peaks_in_slices
from .distribute import LocalRunner, open_runner
from .parallel import make_chunks, spread_chunks
from .params import Params, resolve_device
from .preprocess import (
    band_pass,
    find_bad_channels,
    noise_correlations,
    noise_levels,
    noise_slices,
    referenced,
    referenced_slices,
)
from .scan import Geometry, Scanner, SpikeBatch, TraceCache, concatenate_parts, scan
from .sort.cluster import cluster, clustering_features
from .spikes import PEAK_DTYPE, check_peaks, spikes_from_peaks
from .workarea import WorkArea, digest, recording_identity


class Timer(dict):
    """Wall time per stage, in seconds, in the order the stages ran."""

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Prepared:
    """A recording made ready for every stage: preprocessed, noise measured, neighbourhood built,
    detection signal chosen."""

    recording: object
    params: Params
    noise: np.ndarray
    neighbourhood: Neighbourhood
    timer: Timer = field(default_factory=Timer)
    matched_filter: object = None  # detect.MatchedFilter (None: detect on the traces)
    detection: str = ""  # how spikes are detected, in words (run.json)
    amplitudes: AmplitudeReader | None = None  # how channel amplitudes are read (None: raw traces)
    noise_covariance: np.ndarray | None = (
        None  # (C, C) µV² across channels (preprocess.noise_correlations)
    )
    noise_autocorrelation: np.ndarray | None = None  # (snippet length,) in time, 1 at lag 0
    bad_channels: dict = field(
        default_factory=dict
    )  # channel id -> why it was interpolated (preprocess.find_bad_channels)
    amplitude_denoise_gain: float = 1.0  # the amplitude denoiser's minimum gain until it is fitted, by the next training sample or a sort's _refined_localizer (1: none, or fitted)
    trace_cache: TraceCache | None = (
        None  # the training sample's chunks, kept for the main pass (params.trace_cache_mb)
    )

    def scanner(self, peaks=None, last_pass: bool = False) -> Scanner:
        """A scanner of the recording; the main pass (``last_pass``) takes the chunks the training
        sample kept in ``trace_cache`` instead of reading them again."""
        return Scanner(
            self.recording,
            self.params,
            self.neighbourhood,
            self.noise,
            peaks,
            self.matched_filter,
            self.amplitudes,
            self.trace_cache,
            last_pass,
        )

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_params(self.params, self.recording.get_sampling_frequency())


def prepare(recording, params: Params | None = None, timer: Timer | None = None) -> Prepared:
    params = params or Params()
    timer = timer if timer is not None else Timer()
    check_recording(recording)
    resolve_device(params.device)  # refuse --device cuda without a GPU before any work
    if params.detect_method not in ("matched", "peak"):
        raise UsageError(f"unknown detect_method {params.detect_method!r}: use matched or peak")
    with timer.stage("preprocess"):
        filtered = band_pass(recording, params)
        slices = noise_slices(filtered, params)
        bad_channels = find_bad_channels(filtered, params, slices)
        processed = referenced(filtered, params, bad_channels)
        slices = referenced_slices(slices, filtered, params, bad_channels)
        noise = noise_levels(processed, params, slices)
        geo = Geometry.from_params(params, processed.get_sampling_frequency())
        covariance, autocorrelation = noise_correlations(slices, noise, geo.before + geo.after)
        neighbourhood = Neighbourhood.from_recording(processed, params.neighbourhood_channels)
        matched_filter, detection = (
            None,
            f"negative peaks beyond {params.detect_threshold:g} noise SDs",
        )
        neighbours = neighbourhood.channels_within(params.detect_radius_um)
        if (
            params.detect_method == "matched"
        ):  # its prototype from spikes 1 SD above threshold: clear shapes
            matched_filter = fit_matched_filter(
                slices,
                noise,
                neighbours,
                params.detect_threshold + 1.0,
                geo.sweep,
                geo.prototype_before,
                geo.prototype_after,
            )
            detection = (
                f"matched filter (the recording's mean spike shape) beyond {params.detect_threshold:g} SDs"
                if matched_filter is not None
                else detection + " (too few large spikes in the noise slices "
                "to learn a spike shape for the matched filter)"
            )
        basis = None
        if params.amplitude_components > 0:
            # the amplitudes' basis from every spike past the threshold: far channels of small spikes
            # too (6.5 SDs: square MEA 20 µV median 10.96 µm, 5.5: 10.30, 4: 10.58)
            snippets = [
                gather_windows(traces, rows, neighbourhood.index[channels], geo.before, geo.after)
                for traces, rows, channels in peaks_in_slices(
                    slices,
                    noise,
                    neighbours,
                    params.detect_threshold,
                    geo.sweep,
                    geo.before,
                    geo.after,
                )
            ]
            if snippets:
                basis = fit_amplitude_basis(
                    np.concatenate(snippets), geo.amp_half, geo.before, params.amplitude_components
                )
        amplitudes = AmplitudeReader(geo.before, geo.after, geo.amp_half, basis)
    cache = TraceCache(int(params.trace_cache_mb * 2**20)) if params.trace_cache_mb > 0 else None
    return Prepared(
        processed,
        params,
        noise,
        neighbourhood,
        timer,
        matched_filter,
        detection,
        amplitudes,
        covariance,
        autocorrelation,
        bad_channels,
        min(params.amplitude_denoise_min_gain, 1.0),
        cache,
    )


@dataclass
class TrainingSample:
    """A bounded sample of spikes from chunks spread over the (labelled part of the) recording:
    what every learned stage fits on.

    observations : the localizer's observations (localize/*: centres, amplitudes)
    centre_waveforms : (n, T) µV on the centre channel (waveform basis, clustering PCs)
    peaks : (n,) PEAK_DTYPE
    windows : neural-sorter inputs (sort/neural.Windows), when asked for
    snippets : (n, T, M) float16 µV on the centre's peeling footprint (``footprints``), with windows
    targets, mask : (n, U) labels matched to these spikes, when labels were given
    neighbourhood_waveforms : (n, T, K) float16 µV, kept for an amplitude denoiser fitted later
    """

    observations: dict
    centre_waveforms: np.ndarray
    peaks: np.ndarray
    windows: object = None
    snippets: np.ndarray | None = None
    targets: np.ndarray | None = None
    mask: np.ndarray | None = None
    footprints: np.ndarray | None = (
        None  # (C, M) each channel's peeling footprint (peel_radius_um, peel_max_channels), -1 padded
    )
    neighbourhood_waveforms: np.ndarray | None = None


@dataclass
class SampleJob:
    """One chunk's share of the training sample (at most ``cap`` spikes): what a worker returns
    for ``_training_sample``. With labels every labelled spike of the chunk is kept first."""

    scanner: Scanner
    localizer: object
    cap: int
    seed: int
    windows: bool = False
    labels: object = None  # sort/labels.Labels
    offsets: np.ndarray | None = None  # global position of each segment's first sample
    tolerance: int = 0
    footprints: np.ndarray | None = None  # (C, M) channels of the snippets kept with windows
    neighbourhood_waveforms: bool = (
        False  # keep each spike's (T, K) neighbourhood snippets (the amplitude denoiser's fit)
    )

    def __call__(self, chunk) -> dict:
        # one generator per chunk: the sample does not depend on where or in what order chunks ran
        return self.keep(
            self.scanner.batch(chunk),
            np.random.default_rng([self.seed, chunk.segment_index, chunk.start]),
        )

    def keep(self, batch: SpikeBatch, rng) -> dict:
        from .sort.labels import match
        from .sort.neural import Windows

        n = len(batch.centre)
        out, priority = {}, np.zeros(n)
        if self.labels is not None:
            times = batch.peaks["sample_index"] + self.offsets[batch.peaks["segment_index"]]
            targets, mask = match(self.labels, times, self.tolerance)
            priority = targets.max(axis=1) if n else priority
        pick = (
            np.sort(np.argsort(priority + rng.random(n) * 0.5)[::-1][: self.cap])
            if n
            else np.zeros(0, int)
        )
        if self.labels is not None:
            out.update(targets=targets[pick], mask=mask[pick])
        batch = batch.subset(pick)
        if self.windows:
            out["windows"] = Windows.from_batch(
                batch, self.scanner.neighbourhood, self.scanner.noise
            )
            geo = self.scanner.geometry
            out["snippets"] = gather_windows(
                batch._traces, batch._rows, self.footprints[batch.centre], geo.before, geo.after
            ).astype(np.float16)
        if self.neighbourhood_waveforms:
            out["neighbourhood_waveforms"] = batch.waveforms.astype(np.float16)
        out.update(
            centre_waveforms=batch.waveforms[:, :, 0],
            peaks=batch.peaks,
            **self.localizer.observe(batch, self.scanner.neighbourhood),
        )
        return out


# chunks read first when a sample stops at sample_spikes_per_channel: enough to tell the spike rate
FIRST_SAMPLE_CHUNKS = 10


def _training_sample(
    prep: Prepared,
    localizer,
    peaks,
    progress: bool,
    *,
    windows: bool = False,
    labels=None,
    chunks=None,
    runner=None,
    denoise_later: bool = False,
) -> TrainingSample:
    """At most ``max_training_spikes`` spikes from ``sample_chunks`` chunks spread over
    ``chunks`` (default: the whole recording). With ``labels`` every labelled spike of a chunk
    is kept and the rest are drawn at random. A sample with ``windows`` and no labels (a sort's
    own clustering) stops growing at ``sample_spikes_per_channel`` spikes per channel: a first
    round of chunks tells the spike rate, a second reads only as many more as that needs.

    The first sample of a recording also fits the amplitude denoiser (``_fit_amplitude_denoiser``):
    ``prep.amplitudes`` reads every later amplitude with it. With ``denoise_later`` (the neural
    sort) it fits nothing and keeps the spikes' neighbourhood snippets for ``_refined_localizer``."""
    from .sort.labels import segment_offsets
    from .sort.neural import Windows

    params = prep.params
    denoise = prep.amplitude_denoise_gain < 1 and prep.amplitudes.basis is not None
    chunks = spread_chunks(
        chunks if chunks is not None else make_chunks(prep.recording, prep.geometry.chunk_size),
        params.sample_chunks,
    )
    job = SampleJob(
        prep.scanner(peaks),
        localizer,
        cap=max(1, math.ceil(params.max_training_spikes / max(len(chunks), 1))),
        seed=params.seed,
        windows=windows,
        labels=labels,
        offsets=segment_offsets(prep.recording),
        tolerance=prep.geometry.label_tolerance,
        footprints=prep.neighbourhood.channels_within(
            params.peel_radius_um, params.peel_max_channels
        )
        if windows
        else None,
        neighbourhood_waveforms=denoise,
    )
    runner = runner or LocalRunner()
    enough = (
        params.sample_spikes_per_channel * prep.recording.get_num_channels()
        if windows and labels is None
        else 0
    )
    indices = list(range(len(chunks)))
    first = spread_chunks(indices, FIRST_SAMPLE_CHUNKS) if enough > 0 else indices
    found = dict(runner.map(job, chunks, first, desc="training sample", progress=progress))
    if len(first) < len(indices):
        per_chunk = sum(len(part["peaks"]) for part in found.values()) / len(first)
        wanted = min(len(indices), max(len(first), math.ceil(enough / max(per_chunk, 1e-9))))
        rest = sorted(set(indices) - set(first))
        more = rest if wanted == len(indices) else spread_chunks(rest, wanted - len(first))
        found.update(runner.map(job, chunks, more, desc="training sample", progress=progress))
    found = [found[i] for i in sorted(found) if len(found[i]["peaks"])]
    if not found:  # no spikes: an empty sample of the same shape
        found = [job.keep(_empty_batch(prep), np.random.default_rng(0))]
    win = Windows.concatenate([part.pop("windows") for part in found]) if windows else None
    merged = {k: np.concatenate([part[k] for part in found]) for k in found[0]}
    neighbourhood_waveforms = merged.pop("neighbourhood_waveforms", None)
    if denoise and not denoise_later:
        if _fit_amplitude_denoiser(prep, neighbourhood_waveforms, merged["peaks"]["channel_index"]):
            if getattr(localizer, "max_centres", 1) > 1:
                # amplitude jitter reads other centres' neighbourhoods from the chunks' traces: read again
                return _training_sample(
                    prep,
                    localizer,
                    peaks,
                    progress,
                    windows=windows,
                    labels=labels,
                    chunks=chunks,
                    runner=runner,
                )
            merged.update(
                _observed_snippets(prep, localizer, merged["peaks"], neighbourhood_waveforms)
            )
    sample = TrainingSample(
        {},
        merged.pop("centre_waveforms"),
        merged.pop("peaks"),
        win,
        merged.pop("snippets", None),
        merged.pop("targets", None),
        merged.pop("mask", None),
        job.footprints,
        neighbourhood_waveforms if denoise_later else None,
    )
    sample.observations = merged
    return sample


def _observed_snippets(prep: Prepared, localizer, peaks: np.ndarray, snippets: np.ndarray) -> dict:
    """``localizer``'s observations of spikes from their kept (n, T, K) neighbourhood snippets, with
    amplitudes read as ``prep.amplitudes`` reads them (no second read of the traces)."""
    batch = SpikeBatch(
        peaks, peaks["channel_index"].astype(np.int64), None, prep.amplitudes.of_windows(snippets)
    )
    return localizer.observe(batch, prep.neighbourhood)


def _fit_amplitude_denoiser(prep: Prepared, windows: np.ndarray, centres: np.ndarray) -> bool:
    """Fit the spatio-temporal amplitude denoiser on the sample's (n, T, K) neighbourhood snippets
    and read amplitudes with it from now on (``prep.amplitudes``). False when none could be fitted."""
    reader = prep.amplitudes
    fitted = fit_amplitude_denoiser(
        windows,
        centres,
        reader.basis,
        prep.neighbourhood.index,
        prep.noise_covariance,
        prep.noise_autocorrelation,
        prep.amplitude_denoise_gain,
        seed=prep.params.seed,
    )
    prep.amplitude_denoise_gain = 1.0  # fitted once per recording
    if fitted is None:
        return False
    prep.amplitudes = reader.with_denoiser(*fitted)
    return True


def fit_localizer(prep: Prepared, localizer, sample: TrainingSample, progress: bool) -> None:
    """Train ``localizer`` on the training sample or, for an encoder loaded from a file, adapt
    it to this recording (probe geometry checked, noise levels replaced)."""
    if getattr(localizer, "net", None) is not None:
        localizer.use_recording(prep.neighbourhood, prep.noise)
    else:
        localizer.fit(
            sample.observations, prep.neighbourhood, prep.noise, prep.params, progress=progress
        )


def _empty_batch(prep: Prepared) -> SpikeBatch:
    geo, k = prep.geometry, prep.neighbourhood.size
    return SpikeBatch(
        np.zeros(0, PEAK_DTYPE),
        np.zeros(0, np.int64),
        np.zeros((0, geo.before + geo.after, k), np.float32),
        np.zeros((0, k), np.float32),
        _traces=np.zeros((1, prep.recording.get_num_channels()), np.float32),
        _rows=np.zeros(0, np.int64),
    )


def fit_waveform_basis(waveforms: np.ndarray, num_components: int) -> np.ndarray | None:
    """(T, P) temporal principal components of (n, T) centre-channel waveforms (None if too few)."""
    centre = waveforms.astype(np.float64)
    if len(centre) < max(num_components, 2):
        return None
    _, _, vt = np.linalg.svd(centre - centre.mean(0), full_matrices=False)
    return vt[:num_components].T.astype(np.float32)


def _waveform_pcs(waveforms: np.ndarray, basis: np.ndarray | None, num_pcs: int) -> np.ndarray:
    return (
        (waveforms @ basis).astype(np.float32)
        if basis is not None
        else np.zeros((len(waveforms), num_pcs), np.float32)
    )


LOCATION_FIELDS = ("x", "y", "z", "alpha", "x_std", "y_std", "z_std")


@dataclass
class ChunkJob:
    """The main pass over one chunk: detect (or take given peaks), localize, waveform PCs and,
    with a trained neural sorter, units. Picklable: Dask sends it to each worker once (the
    recording as its description, the models as weights). Returns per-spike arrays and
    ``seconds`` = [reading + detection + features (peeling's second detection too), localization,
    neural sorter (+ peeling's subtraction)]."""

    scanner: Scanner
    localizer: object
    basis: np.ndarray | None
    neural: object = None
    refractory: int = 0
    keep_pcs: bool = True  # False: no waveform PCs (localization only), so no waveform windows unless the neural sorter needs them
    templates: object = None  # sort/peel.Templates: with the neural sorter on detected spikes, peel and detect again
    significance: object = (
        None  # sort/peel.Significance of the templates: assigned spikes must stand out of the noise
    )

    def __call__(self, chunk) -> dict:
        from .sort.neural import Windows
        from .sort.postprocess import assign_units

        params, neighbourhood = self.scanner.params, self.scanner.neighbourhood
        start = time.perf_counter()
        batch = self.scanner.batch(chunk, waveforms=self.keep_pcs or self.neural is not None)
        read = time.perf_counter()
        observations = self.localizer.observe(batch, neighbourhood)
        observed = time.perf_counter()
        peaks, units, detecting = batch.peaks, None, 0.0
        if self.neural is not None:
            proba = self.neural.predict_proba(
                Windows.from_batch(batch, neighbourhood, self.scanner.noise)
            )
            units, _ = assign_units(
                batch.peaks["sample_index"], proba, params.neural_threshold, self.refractory
            )
            if self.templates is not None and self.scanner.peaks is None:
                units = self._significant(
                    batch._traces,
                    batch._rows,
                    self._rescue(batch, proba, units),
                    params.neural_min_z,
                    self.scanner.geometry.template_shift,
                )
                hidden, hidden_units, detecting = self._peel(chunk, batch, units)
                if len(hidden.centre):
                    more = self.localizer.observe(hidden, neighbourhood)
                    # one transform call for all (same batch shapes wherever the chunk runs: same floats)
                    observations = {
                        k: np.concatenate([observations[k], more[k]]) for k in observations
                    }
                    peaks, units = (
                        np.concatenate([peaks, hidden.peaks]),
                        np.concatenate([units, hidden_units]),
                    )
        classified = time.perf_counter()
        location = self.localizer.transform(observations, neighbourhood)
        out = {"peaks": peaks, **{k: np.asarray(location[k], np.float32) for k in LOCATION_FIELDS}}
        if units is not None:
            out["unit_index"] = units
        if len(peaks) > len(batch.peaks):  # spikes found by peeling go in time order
            order = np.argsort(peaks["sample_index"], kind="stable")
            out = {k: v[order] for k, v in out.items()}
        if self.keep_pcs:
            out["pcs"] = _waveform_pcs(batch.waveforms[:, :, 0], self.basis, params.waveform_pcs)
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

    def _rescue(self, batch: SpikeBatch, proba, units: np.ndarray) -> np.ndarray:
        """``units`` with the candidates the network rejected given to the unit whose template fits
        them, among its most probable units (sort/peel.rescue: overlapping spikes)."""
        from .sort.peel import rescue

        params, geo = self.scanner.params, self.scanner.geometry
        if params.neural_rescue_min_probability >= 1:
            return units
        return rescue(
            batch._traces,
            batch._rows,
            proba.cpu().numpy(),
            units,
            self.templates,
            geo.before,
            params.neural_rescue_min_probability,
            params.neural_rescue_min_fit,
            geo.before + geo.after,
        )

    def _significant(
        self, traces: np.ndarray, rows: np.ndarray, units: np.ndarray, min_z: float, max_shift: int
    ) -> np.ndarray:
        """``units`` with -1 where an assigned spike's match with its unit's prewhitened template in
        ``traces``, at its best within ``max_shift`` samples, is under ``min_z`` noise SDs
        (sort/peel.Significance): noise events the network gave to a faint unit."""
        if self.significance is None or min_z <= 0:
            return units
        tested = np.flatnonzero(units >= 0)
        tested = tested[self.templates.defined[units[tested]]]
        z = self.significance.z(
            traces,
            rows[tested],
            units[tested],
            self.templates.channels,
            self.scanner.geometry.before,
            max_shift,
        )
        units = units.copy()
        units[tested[z < min_z]] = -1
        return units

    def _peel(
        self, chunk, batch: SpikeBatch, units: np.ndarray
    ) -> tuple[SpikeBatch, np.ndarray, float]:
        """The spikes found on the residual (sort/peel.py: under the assigned ones, and where the
        first pass found nothing), their units and the seconds spent detecting them."""
        from .sort.neural import Windows
        from .sort.peel import SHIFTS, subtract, unclaimed, unexplained, unfitted
        from .sort.postprocess import assign_units

        neighbourhood, geo = self.scanner.neighbourhood, self.scanner.geometry
        assigned = units >= 0
        residual, changed = subtract(
            batch._traces, batch._rows[assigned], units[assigned], self.templates, geo.before
        )
        detect_start = time.perf_counter()
        hidden = self.scanner.batch_in(
            residual, batch._first, chunk, threshold=self.scanner.params.peel_detect_threshold
        )
        new = changed | unclaimed(
            changed.shape, batch._rows, batch.centre, self.scanner.detect_neighbours, geo.sweep
        )
        hidden = hidden.subset(np.flatnonzero(new[hidden._rows, hidden.centre]))
        detecting = time.perf_counter() - detect_start
        if len(hidden.centre) == 0:
            return hidden, np.zeros(0, np.int64), detecting
        found = hidden.peaks["sample_index"]
        proba = self.neural.predict_proba(
            Windows.from_batch(hidden, neighbourhood, self.scanner.noise)
        )
        hidden_units, _ = assign_units(
            found, proba, self.scanner.params.neural_peel_threshold, self.refractory
        )
        hidden_units = unfitted(
            residual,
            hidden._rows,
            hidden_units,
            self.templates,
            geo.before,
            self.scanner.params.neural_peel_min_fit,
        )
        hidden_units = self._significant(
            residual, hidden._rows, hidden_units, self.scanner.params.neural_peel_min_z, max(SHIFTS)
        )
        return (
            hidden,
            unexplained(
                found,
                hidden_units,
                batch.peaks["sample_index"][assigned],
                units[assigned],
                geo.before + geo.after,
            ),
            detecting,
        )


def _run_chunks(job, chunks: list, runner, work, desc: str, progress: bool) -> list[dict]:
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
                f"{exc}. {finished} of {len(chunks)} chunks are finished and kept in "
                f"{work.path}: run the same command again to continue"
            ) from exc
        raise
    for index in done:
        loaded = work.load_chunk(index)
        if loaded is None:  # unreadable leftover: run that chunk again
            loaded = job(chunks[index])
            work.save_chunk(index, loaded)
        results[index] = loaded
    return [results[i] for i in range(len(chunks))]


def _main_pass(
    prep: Prepared,
    models: "Models",
    peaks,
    progress: bool,
    runner=None,
    work=None,
    keep_pcs: bool = True,
):
    """One pass over every chunk (see ChunkJob). Returns spike records and (n, P) centre-channel
    PCs (None without ``keep_pcs``)."""
    params, timer = prep.params, prep.timer
    templates = models.templates if params.neural_peel else None
    significance = None
    if templates is not None and (params.neural_peel_min_z > 0 or params.neural_min_z > 0):
        from .sort.peel import Significance

        significance = Significance.fit(
            templates, prep.noise_covariance, prep.noise_autocorrelation
        )
    job = ChunkJob(
        prep.scanner(peaks, last_pass=True),
        models.localizer,
        models.basis,
        models.neural,
        prep.geometry.refractory,
        keep_pcs,
        templates,
        significance,
    )
    chunks = job.scanner.chunks()
    started = time.perf_counter()
    try:
        parts = _run_chunks(
            job,
            chunks,
            runner or LocalRunner(),
            work,
            "detect + localize" if peaks is None else "localize",
            progress,
        )
    finally:
        if prep.trace_cache is not None:
            prep.trace_cache.clear()
    # the pass's wall time, shared between stages in proportion to their time in the chunks
    seconds = np.sum([part.pop("seconds") for part in parts], axis=0) if parts else np.zeros(3)
    share = (time.perf_counter() - started) / max(seconds.sum(), 1e-9)
    for stage, spent in zip(("detect", "localize", "neural"), seconds):
        if stage != "neural" or models.neural is not None:
            timer[stage] = timer.get(stage, 0.0) + float(spent * share)
    found = concatenate_parts([p for p in parts if len(p["peaks"])], reorder=peaks is not None)
    if not found:
        return spikes_from_peaks(np.zeros(0, PEAK_DTYPE)), np.zeros(
            (0, params.waveform_pcs), np.float32
        ) if keep_pcs else None
    spikes = spikes_from_peaks(found["peaks"])
    for name in LOCATION_FIELDS + (("unit_index",) if models.neural is not None else ()):
        spikes[name] = found[name]
    return spikes, found["pcs"] if keep_pcs else None


def _fit_models(
    prep: Prepared,
    method: str,
    peaks,
    progress: bool,
    runner=None,
    localizer=None,
    labels=None,
    label_source: str = "",
) -> "Models":
    """Train what the main pass needs on a bounded training sample: the localizer, the
    waveform basis and, for ``label_source`` "clustering" or "labels", the neural sorter."""
    localizer = localizer if localizer is not None else make_localizer(method, prep.params)
    models = Models(
        localizer, notes=list(labels.notes) if labels is not None else [], label_source=label_source
    )
    chunks = _chunks_before(prep, labels.end) if labels is not None else None
    self_training = label_source == "labels" and _with_few_labels(
        prep.params.neural_self_training, prep.params
    )
    adapting = label_source == "labels" and _with_few_labels(
        prep.params.neural_adapted_backbone, prep.params
    )
    later = bool(
        label_source
    )  # the neural sort clusters on amplitudes read without the denoiser (_refined_localizer)
    with prep.timer.stage("fit"):
        sample = _training_sample(
            prep,
            localizer,
            peaks,
            progress,
            windows=bool(label_source),
            labels=labels,
            chunks=chunks,
            runner=runner,
            denoise_later=later,
        )
        # self-training reads a sample of the whole recording anyway; the localizer and the
        # waveform basis learn from it rather than from the few labels' short stretch
        unlabelled = (
            _training_sample(
                prep, localizer, peaks, progress, windows=True, runner=runner, denoise_later=later
            )
            if self_training or adapting
            else None
        )
        fit_on = unlabelled if unlabelled is not None else sample
        if unlabelled is not None:
            sample.neighbourhood_waveforms = None
        fit_localizer(prep, localizer, fit_on, progress)
        models.basis = fit_waveform_basis(fit_on.centre_waveforms, prep.params.waveform_pcs)
        models.amplitudes = prep.amplitudes
    if label_source:
        backbone = (
            _adapted_backbone(prep, unlabelled, localizer, models.basis, models.notes)
            if adapting
            else _backbone(prep.params)
        )
        models.neural, models.templates = _train_neural(
            prep, sample, localizer, models.basis, label_source, models.notes, backbone
        )
        if self_training and models.neural is not None:
            models.neural, models.templates = _self_trained(
                prep, sample, unlabelled, models.neural, labels.end
            )
            models.notes.append(
                f"self-training: the neural sorter trained again on {models.neural.history['train_windows']} "
                "spikes, the labelled ones plus its own labelling of a sample of the whole recording"
            )
        if models.neural is not None and labels is not None:
            models.notes.append(f"neural sorter trained on {labels.num_units} labelled units")
        if models.neural is not None and fit_on.neighbourhood_waveforms is not None:
            with prep.timer.stage("fit"):
                models.localizer = _refined_localizer(prep, localizer, fit_on, progress, runner)
                models.amplitudes = prep.amplitudes
    return models


def _refined_localizer(
    prep: Prepared, localizer, sample: TrainingSample, progress: bool, runner=None
):
    """The neural sort's localizer for the spikes it reports: the one its clustering used (trained on
    amplitudes read without the amplitude denoiser: denoised locations separated neighbouring units
    less well, np128 accuracy 0.960 -> 0.951, NOTES.md session 31) trained ``encoder_refine_epochs``
    more on the sample's amplitudes read with the denoiser, which ``prep.amplitudes`` then reads
    every spike with. A given encoder (``encoder_path``) reads them unchanged, as in ``localize``;
    ``localizer`` unchanged and no denoiser when it cannot be refined."""
    snippets, sample.neighbourhood_waveforms = sample.neighbourhood_waveforms, None
    epochs = prep.params.encoder_refine_epochs
    if (
        getattr(localizer, "refined", None) is None
        or localizer.net is None
        or localizer.fallback is not None
        or epochs <= 0
    ):
        return localizer
    raw = prep.amplitudes
    if (
        not _fit_amplitude_denoiser(prep, snippets, sample.peaks["channel_index"])
        or prep.params.encoder_path
    ):
        return localizer
    if (
        getattr(localizer, "max_centres", 1) > 1
    ):  # amplitude jitter reads other centres' neighbourhoods from the traces
        observations = _training_sample(prep, localizer, None, progress, runner=runner).observations
    else:
        observations = _observed_snippets(prep, localizer, sample.peaks, snippets)
    refined = localizer.refined(observations, prep.neighbourhood, prep.noise, epochs, progress)
    if refined is localizer:  # diverged: the clustering's localizer reads as it was trained
        prep.amplitudes = raw
    return refined


def _locate(prep: Prepared, peaks, method: str, progress: bool, localizer=None):
    """Spike records with locations and the fitted localizer."""
    models = _fit_models(prep, method, peaks, progress, localizer=localizer)
    spikes, _ = _main_pass(prep, models, peaks, progress, keep_pcs=False)
    return spikes, models.localizer


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
    centred on its ``channel_index``.
    """
    params = _as_params(params, localization_method=method)
    prep = prepare(recording, params)
    if peaks is not None:
        peaks = _checked_peaks(prep.recording, peaks)
    spikes, _ = _locate(prep, peaks, params.localization_method, progress)
    return spikes


def _checked_peaks(recording, peaks):
    peaks = check_peaks(peaks, recording.get_num_channels(), recording.get_num_segments())
    for segment in range(recording.get_num_segments()):
        samples = peaks["sample_index"][peaks["segment_index"] == segment]
        n = recording.get_num_samples(segment)
        if len(samples) and (samples.min() < 0 or samples.max() >= n):
            raise UsageError(f"peaks in segment {segment} have sample_index outside 0..{n - 1}")
    return peaks


def _cluster_spikes(prep: Prepared, x, y, amplitude, pcs) -> np.ndarray:
    with prep.timer.stage("cluster"):
        return cluster(clustering_features(x, y, amplitude, pcs, prep.params), prep.params)


@dataclass
class Models:
    """What the main pass needs, fitted on the training sample, and what to tell the user."""

    localizer: object
    basis: np.ndarray | None = None  # (T, P) temporal PCs of centre-channel waveforms
    neural: object = None  # the trained NeuralSorter (None: every spike is clustered instead)
    notes: list = field(default_factory=list)
    label_source: str = ""  # "clustering", "labels" or "" (clustering only)
    templates: object = None  # sort/peel.Templates of the neural sorter's units
    amplitudes: AmplitudeReader | None = (
        None  # how the training sample's amplitudes were read (its fitted denoiser)
    )

    def save(self, folder: Path) -> None:
        """Weights as safetensors and the rest as JSON/NPY (nothing pickled); state.json last."""
        localizer = self.localizer
        state = {
            "notes": self.notes,
            "label_source": self.label_source,
            "localizer": {
                "kind": type(localizer).__name__,
                "fallback_reason": getattr(localizer, "fallback_reason", ""),
                "history": getattr(localizer, "history", None),
            },
            "neural_history": self.neural.history if self.neural is not None else None,
        }
        if getattr(localizer, "net", None) is not None:
            localizer.save(folder / "encoder.safetensors")
        if self.neural is not None:
            self.neural.save(folder / "neural_sorter.safetensors")
        if self.basis is not None:
            write_atomic(folder / "basis.npy", lambda f: np.save(f, self.basis))
        if self.amplitudes is not None and self.amplitudes.components is not None:
            write_atomic(
                folder / "amplitude_denoiser.npz",
                lambda f: np.savez(
                    f, components=self.amplitudes.components, gains=self.amplitudes.gains
                ),
            )
        if self.templates is not None:
            write_atomic(
                folder / "templates.npz",
                lambda f: np.savez(
                    f, waveforms=self.templates.waveforms, channels=self.templates.channels
                ),
            )
        write_atomic(
            folder / "state.json",
            lambda f: f.write(json.dumps(state, default=_json_default).encode()),
        )

    @classmethod
    def load(cls, folder: Path, prep: Prepared) -> "Models":
        from .localize.amortized import AmortizedLocalizer
        from .sort.neural import NeuralSorter

        params = prep.params
        state = json.loads((folder / "state.json").read_text())
        device = resolve_device(params.device)
        if (folder / "encoder.safetensors").exists():
            localizer = AmortizedLocalizer.load(folder / "encoder.safetensors", device=device)
            localizer.use_recording(prep.neighbourhood, prep.noise)
        else:  # centre of mass, chosen or fallen back to: no weights
            localizer = make_localizer(params.localization_method, params)
            if state["localizer"]["fallback_reason"]:
                localizer.fallback = CenterOfMass(params.com_channels)
                localizer.fallback_reason = state["localizer"]["fallback_reason"]
        if state["localizer"]["history"] is not None:
            localizer.history = state["localizer"]["history"]
        neural = None
        if (folder / "neural_sorter.safetensors").exists():
            neural = NeuralSorter.load(folder / "neural_sorter.safetensors", device=device)
            neural.history = state["neural_history"]
        basis = (
            np.load(folder / "basis.npy", allow_pickle=False)
            if (folder / "basis.npy").exists()
            else None
        )
        if (
            folder / "amplitude_denoiser.npz"
        ).exists():  # the main pass reads amplitudes as the models were trained on
            with np.load(folder / "amplitude_denoiser.npz", allow_pickle=False) as saved:
                prep.amplitudes = prep.amplitudes.with_denoiser(saved["components"], saved["gains"])
        prep.amplitude_denoise_gain = 1.0
        templates = None
        if (folder / "templates.npz").exists():
            from .sort.peel import Templates

            with np.load(folder / "templates.npz", allow_pickle=False) as saved:
                templates = Templates(saved["waveforms"], saved["channels"])
        return cls(
            localizer,
            basis,
            neural,
            state["notes"],
            state["label_source"],
            templates,
            prep.amplitudes,
        )


def _backbone(params: Params):
    """The backbone to fine-tune: the shipped pretrained one, one from a file, or None."""
    from .sort.neural import load_backbone
    from .sort.pretrained import BACKBONE_PATH

    choice = params.neural_backbone
    if choice in ("", "none"):
        return None
    path = BACKBONE_PATH if choice == "pretrained" else Path(choice)
    if choice == "pretrained" and not path.exists():
        raise LocsortError(
            f"the pretrained backbone is missing from the package ({path}); re-install locsort "
            "or run scripts/pretrain_backbone.py"
        )
    return load_backbone(path)


def _train_neural(
    prep: Prepared,
    sample: TrainingSample,
    localizer,
    basis,
    label_source: str,
    notes: list,
    backbone,
):
    """A NeuralSorter trained on the training sample, fine-tuning ``backbone`` (None: from
    scratch), and its units' peeling templates, or (None, None) when there is nothing to learn
    (then the caller clusters every spike, and ``notes`` says why)."""
    from .sort.cluster import renumber
    from .sort.peel import Templates

    params = prep.params
    if label_source == "clustering":
        # locsort's own clustering of the sample; spikes it calls noise are unknown, not
        # negatives (HDBSCAN leaves many real spikes out of its dense cores)
        location = localizer.transform(sample.observations, prep.neighbourhood)
        pcs = _waveform_pcs(sample.centre_waveforms, basis, params.waveform_pcs)
        units = _cluster_spikes(prep, location["x"], location["y"], sample.peaks["amplitude"], pcs)
        if params.split_max_rounds > 0:
            from .sort.split import split_units

            with prep.timer.stage("cluster"):
                units, _ = split_units(
                    units,
                    sample.windows,
                    params.cluster_min_size,
                    max_rounds=params.split_max_rounds,
                    seed=params.seed,
                )
        if params.merge_min_similarity < 1.0:
            from .sort.merge import merge_similar_units

            with prep.timer.stage("cluster"):
                units, _ = merge_similar_units(
                    units,
                    sample.windows,
                    params.merge_min_similarity,
                    params.merge_max_amplitude_ratio,
                )
                if params.merge_max_shift_ms > 0 and len(units) and units.max() >= 1:
                    units = _merge_shifted(prep, sample, units)
        copies = _late_copies(prep, sample, units)
        units = renumber(np.where(copies, -1, units))
        num_units = int(units.max()) + 1 if len(units) and units.max() >= 0 else 0
        if num_units and params.cluster_adopt_min_fit < 1.0:
            units = _adopted(prep, sample, units, num_units, np.flatnonzero((units < 0) & ~copies))
        if num_units == 0:
            notes.append(
                "the clustering of the training sample found no units, so the neural sorter was not trained"
            )
            return None, None
        targets, mask = _unit_targets(units, num_units)
        mask[copies] = (
            True  # a late copy is a known negative of every unit: the network learns to reject it
        )
    else:
        targets, mask = sample.targets, sample.mask
        units = _labelled_units(sample)
    labelled = int(mask.any(axis=1).sum())
    if labelled < params.min_training_spikes:
        notes.append(
            f"only {labelled} labelled spikes to train the neural sorter on (at least {params.min_training_spikes} "
            "needed)"
            + (": every spike was clustered instead" if label_source == "clustering" else "")
        )
        if label_source != "clustering":
            raise LocsortError(
                notes[-1] + "; give labels covering more of the recording or a larger K"
            )
        return None, None
    few_labels = (
        label_source == "labels" and params.label_max_spikes_per_unit > 0
    )  # a user's first K spikes per unit
    with prep.timer.stage("train neural"):
        sorter = _new_sorter(params, few_labels).fit(
            sample.windows, targets, mask, backbone=backbone, progress=False
        )
        if label_source != "clustering":
            units = _with_network_units(prep, sample, sorter, units)
        templates = Templates.fit(
            sample.snippets,
            sample.peaks["channel_index"],
            units,
            targets.shape[1],
            sample.footprints,
        )
    return sorter, templates


def _unit_targets(units: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask), each (n, U), for training on ``units`` (-1: unknown, masked for every unit)."""
    targets = np.zeros((len(units), num_units), np.float32)
    targets[np.flatnonzero(units >= 0), units[units >= 0]] = 1.0
    return targets, np.repeat((units >= 0)[:, None], num_units, axis=1)


def _labelled_units(sample: TrainingSample) -> np.ndarray:
    """(n,) the labelled unit of each spike of a sample read with labels, -1: none."""
    known = sample.targets * sample.mask
    return np.where(known.max(axis=1) > 0, known.argmax(axis=1), -1)


def _new_sorter(params: Params, few_labels: bool):
    """An untrained NeuralSorter; with ``few_labels`` (a user's first K spikes per unit) an
    ensemble trained with synthetic positives unless the parameters say otherwise."""
    from .sort.neural import NeuralSorter

    return NeuralSorter(
        epochs=params.neural_epochs,
        lr=params.neural_lr,
        batch_size=params.neural_batch_size,
        patience=params.neural_patience,
        frozen_epochs=params.neural_frozen_epochs,
        max_seconds=params.neural_max_seconds,
        device=resolve_device(params.device),
        seed=params.seed,
        ensemble=params.neural_ensemble or (3 if few_labels else 1),
        synthetic_positives=params.neural_synthetic_positives
        if params.neural_synthetic_positives >= 0
        else (4 if few_labels else 0),
    )


def _with_few_labels(setting: int, params: Params) -> bool:
    """A few-label stage's switch (neural_self_training, neural_adapted_backbone): 1 on, 0 off,
    -1 (auto) on when a user's labels are limited to the first K spikes per unit."""
    return setting > 0 or (setting < 0 and params.label_max_spikes_per_unit > 0)


def _adapted_backbone(prep: Prepared, unlabelled: TrainingSample, localizer, basis, notes: list):
    """The backbone of a network trained, as the default sort trains it, on locsort's own
    clustering of ``unlabelled`` (a sample of the whole recording; no labels used), or the
    configured backbone when the clustering finds no units.

    With K labels per unit the few-label networks learn what tells this recording's units apart
    from K spikes each; a backbone fitted to a pretraining simulator (or a random one) does not
    separate this recording's similar waveforms, and those confusions pass on to self-training.
    A clustering of thousands of spikes, with its own errors between units, still shows the
    backbone the recording's waveforms, channels and noise. bench_transfer, 3 seeds, square MEA
    (another probe type and simulator than the pretraining): pretrained K = 5 / 10 0.723 / 0.823 ->
    0.782 / 0.837, from scratch 0.691 / 0.815 -> 0.811 / 0.836; np64 from scratch K = 5 0.802 ->
    0.873 (NOTES.md session 28)."""
    found, configured = (
        [],
        _backbone(prep.params),
    )  # fit() trains a copy: ``configured`` stays as loaded
    sorter, _ = _train_neural(prep, unlabelled, localizer, basis, "clustering", found, configured)
    if sorter is None:
        notes.append("the backbone was not adapted to this recording (" + "; ".join(found) + ")")
        return configured
    notes.append(
        f"backbone adapted to this recording: trained on locsort's own clustering of {sorter.history['train_windows']} "
        f"spikes into {sorter.num_units} units before the labels"
    )
    return getattr(sorter.net, "members", [sorter.net])[
        0
    ].backbone  # an ensemble (neural_ensemble > 1): its first member's


def _self_trained(
    prep: Prepared, labelled: TrainingSample, unlabelled: TrainingSample, sorter, labelled_end: int
):
    """(sorter, peeling templates) trained again on ``labelled`` (the user's labels) plus
    ``unlabelled`` (a sample of the whole recording) labelled by ``sorter``.

    A network fitted to K spikes per unit has seen each unit in K noise draws, on the one or two
    centre channels those spikes had, and in the first seconds of the recording only; its own
    assignments over the whole recording show it the rest. The second network is trained as on
    locsort's own clustering (one member, no synthetic spikes; candidates the first rejects are
    unknown, not negatives), from scratch: with thousands of labels a backbone pretrained on
    another probe type only holds it back (the few-label stage is where pretraining pays).
    NOTES.md session 26, 3 seeds, K = 10, pretrained backbone in the first stage: np64 0.847 ->
    0.867 (second stage pretrained) / 0.870 (from scratch), square MEA 0.784 -> 0.811 / 0.823."""
    from .sort.labels import segment_offsets
    from .sort.neural import Windows
    from .sort.peel import Templates

    params = prep.params
    # the labelled stretch is in ``labelled`` already, with the user's labels
    times = (
        unlabelled.peaks["sample_index"]
        + segment_offsets(prep.recording)[unlabelled.peaks["segment_index"]]
    )
    later = np.flatnonzero(times >= labelled_end)
    peaks, windows, snippets = (
        unlabelled.peaks[later],
        unlabelled.windows.subset(later),
        unlabelled.snippets[later],
    )
    rest = TrainingSample(
        {},
        unlabelled.centre_waveforms[later],
        peaks,
        windows,
        snippets,
        footprints=unlabelled.footprints,
    )
    num_units, no_units = labelled.targets.shape[1], np.full(len(later), -1, np.int64)
    targets, mask = _unit_targets(_with_network_units(prep, rest, sorter, no_units), num_units)
    with prep.timer.stage("train neural"):
        sorter = _new_sorter(params, few_labels=False).fit(
            Windows.concatenate([labelled.windows, windows]),
            np.concatenate([labelled.targets, targets]),
            np.concatenate([labelled.mask, mask]),
            backbone=None,
            progress=False,
        )
        units = np.concatenate(
            [
                _with_network_units(prep, labelled, sorter, _labelled_units(labelled)),
                _with_network_units(prep, rest, sorter, no_units),
            ]
        )
        templates = Templates.fit(
            np.concatenate([labelled.snippets, snippets]),
            np.concatenate([labelled.peaks["channel_index"], peaks["channel_index"]]),
            units,
            num_units,
            labelled.footprints,
        )
    return sorter, templates


def _adopted(
    prep: Prepared, sample: TrainingSample, units: np.ndarray, num_units: int, open_rows: np.ndarray
) -> np.ndarray:
    """``units`` with the unclustered spikes at ``open_rows`` given to the cluster whose template
    fits them (sort/peel.adopt): a unit's spikes detected away from its usual channel."""
    from .sort.peel import Templates, adopt

    with prep.timer.stage("cluster"):
        templates = Templates.fit(
            sample.snippets, sample.peaks["channel_index"], units, num_units, sample.footprints
        )
        return adopt(
            sample.snippets,
            sample.footprints[sample.peaks["channel_index"]],
            units,
            open_rows,
            templates,
            prep.params.cluster_adopt_min_fit,
            prep.noise,
            prep.params.cluster_adopt_max_residual,
        )


def _late_copies(prep: Prepared, sample: TrainingSample, units: np.ndarray) -> np.ndarray:
    """(n,) bool: the sample's spikes in clusters that repeat a larger cluster's spikes within
    ``duplicate_unit_max_lag_ms`` (sort/postprocess.duplicate_units): one neuron's spikes
    detected again on far channels. On the 128-channel MEArec recording two such clusters
    became units whose spikes were false positives of a true unit (#8's precision 0.68;
    NOTES.md, session 21)."""
    from .sort.labels import segment_offsets
    from .sort.postprocess import repeated_unit_spikes

    params = prep.params
    if params.duplicate_unit_min_shared >= 1.0:
        return np.zeros(len(units), bool)
    times = (
        sample.peaks["sample_index"]
        + segment_offsets(prep.recording)[sample.peaks["segment_index"]]
    )
    return repeated_unit_spikes(
        times,
        units,
        prep.recording.get_sampling_frequency(),
        params.duplicate_unit_min_shared,
        params.duplicate_unit_max_lag_ms,
    )


def _with_network_units(
    prep: Prepared, sample: TrainingSample, sorter, units: np.ndarray
) -> np.ndarray:
    """``units`` (-1: unlabelled) with the unlabelled spikes of the sample given the unit the
    trained network assigns them, so that peeling templates average all of a unit's sample
    spikes: a user's labels may be only the first K spikes of each unit, and 10 spikes make a
    noisy template (or none, below peel.MIN_SPIKES on the unit's usual centre)."""
    import torch

    from .sort.postprocess import assign_units

    proba = sorter.predict_proba(sample.windows)
    assigned = np.full(len(units), -1, np.int64)
    segments = sample.peaks["segment_index"]
    for segment in np.unique(segments):
        rows = np.flatnonzero(segments == segment)
        assigned[rows], _ = assign_units(
            sample.peaks["sample_index"][rows],
            proba[torch.as_tensor(rows, device=proba.device)],
            prep.params.neural_threshold,
            prep.geometry.refractory,
        )
    return np.where(units >= 0, units, assigned)


def _merge_shifted(prep: Prepared, sample: TrainingSample, units: np.ndarray) -> np.ndarray:
    """Training-sample clusters with those merged that are one neuron detected on channels
    whose troughs come at different times (sort/merge.merge_shifted_units), renumbered."""
    from .sort.cluster import renumber
    from .sort.merge import merge_shifted_units
    from .sort.peel import Templates

    params = prep.params
    templates = Templates.fit(
        sample.snippets,
        sample.peaks["channel_index"],
        units,
        int(units.max()) + 1,
        sample.footprints,
    )
    max_lag = int(round(params.merge_max_shift_ms * prep.recording.get_sampling_frequency() / 1000))
    units, _ = merge_shifted_units(
        units,
        templates,
        len(sample.footprints),
        params.merge_min_similarity,
        max_lag,
        params.merge_max_amplitude_ratio,
    )
    return renumber(units)


def _sort(
    prep: Prepared, progress: bool, labels=None, runner=None, work=None
) -> tuple[np.ndarray, Models]:
    """Spike records with locations and units: the sorter of ``params.sorter``.

    "neural" (default): models fit on a bounded training sample (localizer; labels from
    ``labels`` or from clustering the sample; the neural sorter), then one streaming pass
    assigns every spike. "cluster": one pass localizes every spike, then all are clustered.

    With a work area (``work``), the models are kept there once trained and every finished
    chunk too; a run started again on the same work area reuses both. The models the main pass
    uses are always the ones read back from the work area, so that a resumed run and an
    uninterrupted one compute the same thing.
    """
    from .sort.labels import labels_from_sorting
    from .sort.postprocess import drop_border_duplicates, duplicate_units, lagged_copy_spikes

    params = prep.params
    if params.sorter not in ("neural", "cluster"):
        raise UsageError(f"unknown sorter {params.sorter!r}: use neural or cluster")
    if labels is not None and params.sorter != "neural":
        raise UsageError("labels train the neural sorter: use sorter=neural")
    if work is not None and work.has_models():
        models = Models.load(work.models_dir, prep)
    else:
        label_set = (
            labels_from_sorting(labels, prep.recording, params.label_max_spikes_per_unit)
            if labels is not None
            else None
        )
        source = (
            "" if params.sorter != "neural" else "labels" if labels is not None else "clustering"
        )
        if (
            params.sorter == "cluster"
        ):  # every spike is clustered on its locations: no denoiser (see _refined_localizer)
            prep.amplitude_denoise_gain = 1.0
        models = _fit_models(
            prep,
            params.localization_method,
            None,
            progress,
            runner=runner,
            labels=label_set,
            label_source=source,
        )
        if work is not None:
            models.save(work.clear_models())
            models = Models.load(work.models_dir, prep)
    spikes, pcs = _main_pass(
        prep, models, None, progress, runner, work, keep_pcs=models.neural is None
    )
    if models.neural is None:
        spikes["unit_index"] = _cluster_spikes(
            prep, spikes["x"], spikes["y"], spikes["amplitude"], pcs
        )
    else:
        spikes["unit_index"] = drop_border_duplicates(
            spikes["segment_index"],
            spikes["sample_index"],
            spikes["unit_index"],
            prep.geometry.refractory,
        )
    if (
        models.label_source != "labels" and params.duplicate_unit_min_shared < 1.0
    ):  # a user's units are kept as given
        removed = duplicate_units(
            sorting_from_spikes(spikes, prep.recording),
            params.duplicate_unit_min_shared,
            params.duplicate_unit_max_lag_ms,
        )
        spikes["unit_index"][np.isin(spikes["unit_index"], removed)] = -1
    if models.neural is not None:
        copies = lagged_copy_spikes(
            spikes["segment_index"],
            spikes["sample_index"],
            spikes["unit_index"],
            spikes["amplitude"],
            prep.recording.get_sampling_frequency(),
            prep.recording.get_total_samples(),
            params.duplicate_unit_max_lag_ms,
            params.lagged_copy_min_share,
        )
        spikes["unit_index"][copies] = -1
    return spikes, models


def _chunks_before(prep: Prepared, end: int):
    """The chunks that start before global position ``end`` (the labelled stretch)."""
    from .sort.labels import segment_offsets

    offsets = segment_offsets(prep.recording)
    chunks = make_chunks(prep.recording, prep.geometry.chunk_size)
    return [c for c in chunks if offsets[c.segment_index] + c.start < end] or chunks[:1]


def sorting_from_spikes(spikes: np.ndarray, recording):
    """A SpikeInterface sorting of the spikes that have a unit (unit ids: their ``unit_index``)."""
    from spikeinterface.core import NumpySorting

    assigned = spikes[spikes["unit_index"] >= 0]
    samples, labels = [], []
    for segment in range(recording.get_num_segments()):
        s = assigned[assigned["segment_index"] == segment]
        order = np.argsort(s["sample_index"], kind="stable")
        samples.append(s["sample_index"][order].astype(np.int64))
        labels.append(s["unit_index"][order].astype(np.int64))
    unit_ids = np.unique(assigned["unit_index"]).astype(np.int64)
    return NumpySorting.from_samples_and_labels(
        samples, labels, recording.get_sampling_frequency(), unit_ids=unit_ids
    )


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
    ``scheduler``: on the existing Dask cluster at that address. Results are the same either way.
    """
    prep = prepare(recording, _as_params(params))
    with open_runner(workers, scheduler, connect_timeout) as runner:
        spikes, _ = _sort(prep, progress, labels, runner)
    return sorting_from_spikes(spikes, prep.recording)


@dataclass
class RunResult:
    out: Path
    spikes: np.ndarray
    sorting: object
    timings: dict
    evaluation: dict | None
    note: str | None = (
        None  # what the user should know, e.g. why the localizer fell back to centre of mass
    )


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
    ``scheduler``: as for ``sort``; ``runner``: an open ``distribute`` runner to use instead
    (one Dask cluster for several recordings).

    ``out`` appears only when complete (built under a temporary name, then renamed). Until
    then the run keeps its trained models and finished chunks in a work area beside ``out``
    (locsort.workarea): the same call after an interruption continues from there and gives
    the same result; ``overwrite`` starts afresh.
    """
    from . import __version__

    params = _as_params(params)
    out = check_output_folder(out, overwrite)  # fail before any computation
    timer = Timer()
    started = time.time()
    prep = prepare(recording, params, timer)
    identity = {
        "locsort": __version__,
        "recording": recording_identity(prep.recording),
        "params": params.asdict(),
        "labels": _labels_identity(labels),
    }
    num_chunks = len(make_chunks(prep.recording, prep.geometry.chunk_size))
    runner_context = (
        contextlib.nullcontext(runner)
        if runner is not None
        else open_runner(workers, scheduler, connect_timeout)
    )
    with WorkArea(out, identity, num_chunks, overwrite) as work, runner_context as runner:
        resumed = {"models": work.has_models(), "chunks": work.resumed, "of_chunks": num_chunks}
        if progress and (resumed["models"] or resumed["chunks"]):
            tqdm.write(
                f"locsort: continuing an interrupted run from {work.path} (trained models: "
                f"{'kept' if resumed['models'] else 'to train'}; {resumed['chunks']} of {num_chunks} chunks done)",
                file=sys.stderr,
            )
        spikes, models = _sort(prep, progress, labels, runner, work)
        execution = {"runner": runner.description, "workers": runner.workers, "resumed": resumed}
        result = _write_run(
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


def _write_run(
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
    source,
    command,
    execution: dict,
) -> RunResult:
    """Evaluate (with ground truth) and write the output folder in one rename."""
    from . import __version__
    from .evaluate import detected_localization_errors, sorting_accuracy

    params, result = prep.params, models
    localizer = result.localizer
    sorting = sorting_from_spikes(spikes, prep.recording)
    evaluation = None
    if ground_truth is not None:
        with timer.stage("evaluate"):
            evaluation = {
                "localization": detected_localization_errors(spikes, prep.recording, ground_truth),
                "sorting": sorting_accuracy(sorting, ground_truth),
            }
    localization = {
        "method": params.localization_method,
        "fallback": getattr(localizer, "fallback_reason", "") or None,
        "training": getattr(localizer, "history", None) or None,
    }
    sorter = {
        "sorter": params.sorter,
        "labels": result.label_source or None,
        "notes": result.notes,
        "neural_training": result.neural.history if result.neural is not None else None,
    }
    notes = ([localization["fallback"]] if localization["fallback"] else []) + result.notes
    if prep.bad_channels:
        notes.insert(
            0,
            "channels interpolated from their neighbours: "
            + ", ".join(f"{channel} ({why})" for channel, why in prep.bad_channels.items()),
        )
    if execution["resumed"]["models"] or execution["resumed"]["chunks"]:
        notes.append(
            f"continued an interrupted run ({execution['resumed']['chunks']} of {execution['resumed']['of_chunks']} "
            "chunks were already done)"
        )
    with atomic_folder(out, overwrite) as tmp:
        with timer.stage("write"):
            save_npy_atomic(tmp / "spikes.npy", spikes)
            save_sorting(sorting, tmp / "sorting")
            if (
                getattr(localizer, "net", None) is not None
            ):  # reusable on recordings of the same probe type
                localizer.save(tmp / "encoder.safetensors")
            if result.neural is not None:
                result.neural.save(tmp / "neural_sorter.safetensors")
            if phy:
                _export_phy(prep.recording, sorting, tmp / "phy")
        with timer.stage("report"):
            from .report import write_report

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
                "duration_s": float(
                    sum(
                        prep.recording.get_duration(s)
                        for s in range(prep.recording.get_num_segments())
                    )
                ),
            },
            "bad_channels": {str(channel): why for channel, why in prep.bad_channels.items()},
            "detection": prep.detection,
            "amplitudes": prep.amplitudes.description,
            "num_spikes": int(len(spikes)),
            "num_units": int(len(sorting.unit_ids)),
            "localization": localization,
            "sorting": sorter,
            "execution": execution,
            "evaluation": evaluation,
            "versions": _versions(),
        }
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return RunResult(out, spikes, sorting, dict(timer), evaluation, "; ".join(notes) or None)


def save_sorting(sorting, folder: Path) -> None:
    """``sorting`` (in memory, from ``sorting_from_spikes``) saved as a SpikeInterface folder,
    without SpikeInterface's warning that an in-memory sorting has no provenance to save: a run's
    provenance is its run.json (or run_sorter's own log), and the warning only puzzled users.
    Used by ``run`` and by the run_sorter plug-in."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The extractor is not serializable to file")
        sorting.save(folder=folder)


def _export_phy(recording, sorting, folder: Path) -> None:
    from spikeinterface.core import create_sorting_analyzer
    from spikeinterface.exporters import export_to_phy

    if len(sorting.unit_ids) == 0:
        raise LocsortError("no units were found, so there is nothing to export to Phy")
    analyzer = create_sorting_analyzer(sorting, recording, sparse=True, format="memory")
    analyzer.compute(["random_spikes", "templates"], verbose=False)
    export_to_phy(
        analyzer,
        folder,
        compute_pc_features=False,
        compute_amplitudes=True,
        copy_binary=True,
        verbose=False,
    )


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
