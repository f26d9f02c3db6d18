"""Stage 2: the training sample, a bounded set of spikes from chunks spread over the recording
that every learned stage fits on, and the amplitude denoiser fitted on it. Memory depends on
the sample's size, never on the recording's duration."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .chunks import make_chunks, spread_chunks
from .neighbourhood import AmplitudeReader, fit_amplitude_denoiser, gather_windows
from .prepare import Prepared
from .runners import LocalRunner
from .scan import Scanner, SpikeBatch
from .sort.labels import match, segment_offsets
from .sort.neural import Windows
from .spikes import PEAK_DTYPE

# chunks read first when a sample stops at sample_spikes_per_channel: enough to tell the spike rate
FIRST_SAMPLE_CHUNKS = 10


@dataclass
class TrainingSample:
    """A bounded sample of spikes from chunks spread over the (labelled part of the) recording.

    observations : the localizer's observations (localize/*: centres, amplitudes)
    centre_waveforms : (n, T) µV on the centre channel (waveform basis, clustering PCs)
    peaks : (n,) PEAK_DTYPE
    windows : neural-sorter inputs (sort/neural.Windows), when asked for
    snippets : (n, T, M) float16 µV on the centre's peeling footprint (``footprints``), with
        windows
    targets, mask : (n, U) labels matched to these spikes, when labels were given
    footprints : (C, M) each channel's peeling footprint, -1 padded, with windows
    neighbourhood_waveforms : (n, T, K) float16 µV, kept to fit an amplitude denoiser on
    duration : samples in the chunks the spikes were drawn from
    """

    observations: dict
    centre_waveforms: np.ndarray
    peaks: np.ndarray
    windows: object = None
    snippets: np.ndarray | None = None
    targets: np.ndarray | None = None
    mask: np.ndarray | None = None
    footprints: np.ndarray | None = None
    neighbourhood_waveforms: np.ndarray | None = None
    duration: int = 0

    def subset(self, rows: np.ndarray) -> TrainingSample:
        """The spikes at ``rows``, without observations, labels or neighbourhood waveforms."""
        return TrainingSample(
            {},
            self.centre_waveforms[rows],
            self.peaks[rows],
            self.windows.subset(rows),
            self.snippets[rows],
            footprints=self.footprints,
            duration=self.duration,
        )

    def times(self, recording) -> np.ndarray:
        """(n,) each spike's position in the recording, segments laid end to end."""
        return self.peaks["sample_index"] + segment_offsets(recording)[self.peaks["segment_index"]]


@dataclass
class SampleJob:
    """One chunk's share of the training sample (at most ``cap`` spikes), picklable for Dask.
    With labels every labelled spike of the chunk is kept first."""

    scanner: Scanner
    localizer: object
    cap: int
    seed: int
    windows: bool = False
    labels: object = None  # sort/labels.Labels
    offsets: np.ndarray | None = None  # global position of each segment's first sample
    tolerance: int = 0
    footprints: np.ndarray | None = None  # (C, M) channels of the snippets kept with windows
    neighbourhood_waveforms: bool = False  # keep each spike's (T, K) neighbourhood snippets

    def __call__(self, chunk) -> dict:
        # one generator per chunk: the sample does not depend on where or in what order chunks ran
        rng = np.random.default_rng([self.seed, chunk.segment_index, chunk.start])
        return self.keep(self.scanner.batch(chunk), rng)

    def keep(self, batch: SpikeBatch, rng) -> dict:
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
            counts = self.scanner.counts
            out["snippets"] = gather_windows(
                batch._traces,
                batch._rows,
                self.footprints[batch.centre],
                counts.before,
                counts.after,
            ).astype(np.float16)
        if self.neighbourhood_waveforms:
            out["neighbourhood_waveforms"] = batch.waveforms.astype(np.float16)
        out.update(
            centre_waveforms=batch.waveforms[:, :, 0],
            peaks=batch.peaks,
            **self.localizer.observe(batch, self.scanner.neighbourhood),
        )
        return out


def training_sample(
    prep: Prepared,
    localizer,
    peaks,
    progress: bool,
    *,
    amplitudes: AmplitudeReader | None = None,
    windows: bool = False,
    labels=None,
    chunks=None,
    runner=None,
    keep_neighbourhood: bool = False,
) -> TrainingSample:
    """At most ``max_training_spikes`` spikes from ``sample_chunks`` chunks spread over
    ``chunks`` (default: the whole recording), their amplitudes read with ``amplitudes``
    (default: without a denoiser). With ``labels`` every labelled spike of a chunk is kept and
    the rest are drawn at random. A sample with ``windows`` and no labels (a sort's own
    clustering) stops growing at ``sample_spikes_per_channel`` spikes per channel: a first round
    of chunks tells the spike rate, a second reads only as many more as that needs. With
    ``keep_neighbourhood`` the spikes' neighbourhood snippets are kept (``fit_denoiser``)."""
    constants = prep.params.constants
    chunks = spread_chunks(
        chunks if chunks is not None else make_chunks(prep.recording, prep.counts.chunk_size),
        constants.sample_chunks,
    )
    footprints = (
        prep.neighbourhood.channels_within(constants.peel_radius_um, constants.peel_max_channels)
        if windows
        else None
    )
    job = SampleJob(
        prep.scanner(peaks, amplitudes),
        localizer,
        cap=max(1, math.ceil(constants.max_training_spikes / max(len(chunks), 1))),
        seed=prep.params.seed,
        windows=windows,
        labels=labels,
        offsets=segment_offsets(prep.recording),
        tolerance=prep.counts.label_tolerance,
        footprints=footprints,
        neighbourhood_waveforms=keep_neighbourhood,
    )
    runner = runner or LocalRunner(prep.params.n_jobs)
    enough = (
        constants.sample_spikes_per_channel * prep.recording.get_num_channels()
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
    duration = sum(chunks[i].end - chunks[i].start for i in found)
    found = [found[i] for i in sorted(found) if len(found[i]["peaks"])]
    if not found:  # no spikes: an empty sample of the same shape
        found = [job.keep(_empty_batch(prep), np.random.default_rng(0))]
    win = Windows.concatenate([part.pop("windows") for part in found]) if windows else None
    merged = {k: np.concatenate([part[k] for part in found]) for k in found[0]}
    sample = TrainingSample(
        {},
        merged.pop("centre_waveforms"),
        merged.pop("peaks"),
        win,
        merged.pop("snippets", None),
        merged.pop("targets", None),
        merged.pop("mask", None),
        footprints,
        merged.pop("neighbourhood_waveforms", None),
        duration,
    )
    sample.observations = merged
    return sample


def fit_denoiser(prep: Prepared, sample: TrainingSample) -> AmplitudeReader | None:
    """The amplitude reader with a spatio-temporal denoiser fitted on the sample's (n, T, K)
    neighbourhood snippets (neighbourhood.fit_amplitude_denoiser), or None when none can be."""
    reader = prep.amplitudes
    fitted = fit_amplitude_denoiser(
        sample.neighbourhood_waveforms,
        sample.peaks["channel_index"],
        reader.basis,
        prep.neighbourhood.index,
        prep.noise_covariance,
        prep.noise_autocorrelation,
        prep.params.constants.amplitude_denoise_min_gain,
        seed=prep.params.seed,
    )
    return None if fitted is None else reader.with_denoiser(*fitted)


def observed_again(
    prep: Prepared,
    localizer,
    sample: TrainingSample,
    amplitudes: AmplitudeReader,
    *,
    progress: bool = False,
    runner=None,
    peaks=None,
    **sample_args,
) -> TrainingSample:
    """``sample`` with its observations read with ``amplitudes``: from its kept neighbourhood
    snippets (no second read of the traces) or, when the localizer needs the traces themselves
    (amplitude jitter reads other centres' neighbourhoods), by drawing the sample again
    (``peaks``, ``sample_args``: as ``training_sample``)."""
    if getattr(localizer, "max_centres", 1) > 1:
        return training_sample(
            prep, localizer, peaks, progress, amplitudes=amplitudes, runner=runner, **sample_args
        )
    batch = SpikeBatch(
        sample.peaks,
        sample.peaks["channel_index"].astype(np.int64),
        None,
        amplitudes.of_windows(sample.neighbourhood_waveforms),
    )
    return replace(
        sample,
        observations=localizer.observe(batch, prep.neighbourhood),
        neighbourhood_waveforms=None,
    )


def denoised_sample(
    prep: Prepared, localizer, peaks, progress: bool, *, runner=None, **sample_args
) -> tuple[TrainingSample, AmplitudeReader]:
    """(training sample, amplitude reader): the sample's amplitudes read with an amplitude
    denoiser fitted on it, where one can be fitted (else without one). ``sample_args``: as
    ``training_sample``."""
    sample = training_sample(
        prep,
        localizer,
        peaks,
        progress,
        runner=runner,
        keep_neighbourhood=prep.denoise,
        **sample_args,
    )
    reader = fit_denoiser(prep, sample) if prep.denoise else None
    if reader is None:
        return replace(sample, neighbourhood_waveforms=None), prep.amplitudes
    again = observed_again(
        prep,
        localizer,
        sample,
        reader,
        progress=progress,
        runner=runner,
        peaks=peaks,
        **sample_args,
    )
    return again, reader


def chunks_before(prep: Prepared, end: int) -> list:
    """The chunks that start before global position ``end`` (a labelled stretch)."""
    offsets = segment_offsets(prep.recording)
    chunks = make_chunks(prep.recording, prep.counts.chunk_size)
    return [c for c in chunks if offsets[c.segment_index] + c.start < end] or chunks[:1]


def _empty_batch(prep: Prepared) -> SpikeBatch:
    counts, k = prep.counts, prep.neighbourhood.size
    return SpikeBatch(
        np.zeros(0, PEAK_DTYPE),
        np.zeros(0, np.int64),
        np.zeros((0, counts.before + counts.after, k), np.float32),
        np.zeros((0, k), np.float32),
        _traces=np.zeros((1, prep.recording.get_num_channels()), np.float32),
        _rows=np.zeros(0, np.int64),
    )
