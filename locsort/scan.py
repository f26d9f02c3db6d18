"""One pass over the traces, chunk by chunk: detect spikes (or take the caller's peaks), find
each spike's centre channel, extract its neighbourhood waveforms, and hand them to a consumer
that keeps only what it needs. Memory is one chunk of traces plus what the consumer keeps."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .detect import MatchedFilter, detect_chunk
from .errors import LocsortError
from .io import describe_files
from .neighbourhood import AmplitudeReader, Neighbourhood, gather_windows
from .chunks import Chunk, make_chunks, read_chunk
from .params import Params
from .spikes import PEAK_DTYPE


@dataclass
class SpikeBatch:
    """The spikes of one chunk and their neighbourhood features.

    peaks : (n,) PEAK_DTYPE, the caller's peaks or the detected ones (amplitude: signed µV)
    centre : (n,) the neighbourhood's centre channel: the peak's channel
    waveforms : (n, T, K) µV on the centre's neighbourhood (virtual slots are 0); None when not
        extracted
    amplitudes : (n, K) negative-peak size per slot (positive µV), within the amplitude window
        (neighbourhood.AmplitudeReader); idem
    order : (n,) position of each spike in the caller's peak array (given peaks only)

    While the chunk is being processed, ``amplitudes_around`` reads the neighbourhood
    amplitudes around other centre channels (amplitude jitter) from the chunk's traces.
    """

    peaks: np.ndarray
    centre: np.ndarray
    waveforms: np.ndarray | None
    amplitudes: np.ndarray | None
    order: np.ndarray | None = None
    _traces: np.ndarray | None = None
    _rows: np.ndarray | None = None  # each spike's row in _traces
    _reader: AmplitudeReader | None = None  # how ``amplitudes`` were read
    _first: int = 0  # sample index of _traces' first row

    def subset(self, rows: np.ndarray) -> "SpikeBatch":
        pick = lambda a: None if a is None else a[rows]
        return SpikeBatch(
            self.peaks[rows],
            self.centre[rows],
            pick(self.waveforms),
            pick(self.amplitudes),
            pick(self.order),
            self._traces,
            pick(self._rows),
            self._reader,
            self._first,
        )

    def amplitudes_around(self, channels: np.ndarray, neighbourhood: Neighbourhood) -> np.ndarray:
        """(n, K) negative-peak sizes on the neighbourhood of ``channels`` (n,), read the same
        way."""
        return self._reader.at(self._traces, self._rows, neighbourhood.index[channels])


@dataclass(frozen=True)
class SampleCounts:
    """Durations of the parameters and constants as sample counts at a sampling rate."""

    before: int
    after: int
    amp_half: int
    sweep: int
    margin: int
    chunk_size: int
    refractory: int  # neural sorter: one unit's candidates closer than this are one spike
    template_shift: (
        int  # neural sorter: a first-pass spike's template match is searched this far around it
    )
    label_tolerance: int  # a labelled spike marks the nearest candidate within this
    prototype_before: int  # matched-filter prototype: samples before its trough ...
    prototype_after: int  # ... and after

    @classmethod
    def from_params(cls, params: Params, fs: float) -> "SampleCounts":
        ms = fs / 1000.0
        before = max(1, int(round(params.constants.snippet_ms_before * ms)))
        after = max(1, int(round(params.constants.snippet_ms_after * ms)))
        amp_half = max(1, int(round(params.constants.amplitude_window_ms * ms)))
        sweep = max(1, int(round(params.constants.detect_sweep_ms * ms)))
        proto_before = max(1, int(round(params.constants.matched_filter_ms_before * ms)))
        proto_after = max(1, int(round(params.constants.matched_filter_ms_after * ms)))
        # the detection signal must be whole within +/- sweep of every sample of the chunk
        margin = max(
            before,
            after,
            amp_half,
            sweep + max(proto_before, proto_after) + 1,
            int(round(params.constants.chunk_margin_ms * ms)),
        )
        return cls(
            before,
            after,
            amp_half,
            sweep,
            margin,
            max(1, int(round(params.chunk_duration * fs))),
            int(round(params.constants.neural_refractory_ms * ms)),
            int(round(params.constants.neural_min_z_shift_ms * ms)),
            int(round(params.constants.label_tolerance_ms * ms)),
            proto_before,
            proto_after,
        )


class TraceCache:
    """Preprocessed chunk traces read by one pass and wanted again by a later one: the training
    sample's chunks, which the main pass would otherwise read and filter a second time (band-pass
    and median reference are about a third of the main pass's work per chunk), with the peaks
    detected on them (the main pass detects the same ones first). Holds at most ``max_bytes``;
    a chunk that does not fit is read again as before. Threads share it.

    Reading the main pass's other chunks ahead while the models train was tried and dropped:
    the training's torch threads then wait on the reading thread (docs/design-decisions.md,
    § Execution)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held: dict[Chunk, tuple[np.ndarray, int, np.ndarray | None]] = {}
        self.bytes = 0
        self._lock = threading.Lock()

    def put(
        self, chunk: Chunk, traces: np.ndarray, first: int, detected: np.ndarray | None = None
    ) -> None:
        """Keep ``chunk``'s traces (first row: sample ``first``) and the peaks detected on them
        (PEAK_DTYPE, None when none were detected), if there is room."""
        with self._lock:
            if chunk not in self.held and self.bytes + traces.nbytes <= self.max_bytes:
                for array in (
                    traces,
                    detected,
                ):  # shared by passes: nobody may change them in place
                    if array is not None:
                        array.flags.writeable = False
                self.held[chunk] = (traces, first, detected)
                self.bytes += traces.nbytes

    def get(
        self, chunk: Chunk, remove: bool = False
    ) -> tuple[np.ndarray, int, np.ndarray | None] | None:
        with self._lock:
            held = self.held.pop(chunk, None) if remove else self.held.get(chunk)
            if held is not None and remove:
                self.bytes -= held[0].nbytes
            return held

    def clear(self) -> None:
        with self._lock:
            self.held.clear()
            self.bytes = 0


@dataclass
class Scanner:
    """Turns one chunk into a SpikeBatch: read (with margins), detect or select the caller's
    peaks, extract neighbourhood features. Small and picklable: Dask workers receive it once and
    read the recording themselves (a SpikeInterface recording pickles as its description).

    peaks : the caller's peaks (PEAK_DTYPE) instead of detection; batches then carry ``order``
    matched_filter : detect.MatchedFilter to detect on (None: on the traces themselves)
    """

    recording: object
    params: Params
    neighbourhood: Neighbourhood
    noise: np.ndarray
    peaks: np.ndarray | None = None
    matched_filter: MatchedFilter | None = None
    amplitudes: AmplitudeReader | None = None  # None: the raw traces' minimum
    cache: TraceCache | None = (
        None  # chunks' traces kept from an earlier pass (not sent to Dask workers)
    )
    last_pass: bool = (
        False  # with ``cache``: take cached chunks out and keep none (True), or keep what is read
    )

    def __post_init__(self):
        self.counts = counts = SampleCounts.from_params(
            self.params, self.recording.get_sampling_frequency()
        )
        if self.amplitudes is None:
            self.amplitudes = AmplitudeReader(counts.before, counts.after, counts.amp_half)
        if self.matched_filter is not None:  # the score is already in noise SDs
            self.thresholds = np.full(len(self.noise), self.params.detect_threshold, np.float32)
        else:
            self.thresholds = (self.params.detect_threshold * np.asarray(self.noise)).astype(
                np.float32
            )
        self.detect_neighbours = self.neighbourhood.channels_within(
            self.params.constants.detect_radius_um
        )
        if self.peaks is not None:
            self.sort = np.lexsort((self.peaks["sample_index"], self.peaks["segment_index"]))
            self.sorted_peaks = self.peaks[self.sort]

    # pickled (for Dask workers) with the recording as its SpikeInterface description, opened
    # again on first use where it lands: the worker reads the file itself
    def __getstate__(self):
        state = self.__dict__.copy()
        state["cache"] = None
        recording = state.pop("recording")
        state["_description"] = (
            recording.to_dict(recursive=True)
            if recording is not None
            else state.get("_description")
        )
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.recording = None

    def _open(self):
        if self.recording is None:
            from spikeinterface.core.base import BaseExtractor

            try:
                self.recording = BaseExtractor.from_dict(self._description)
            except Exception as exc:
                raise LocsortError(
                    f"cannot open {describe_files(self._description)} here ({exc}); every worker "
                    "must see the recording's files at the same path"
                ) from exc
        return self.recording

    def chunks(self) -> list[Chunk]:
        return make_chunks(self.recording, self.counts.chunk_size)

    def batch(self, chunk: Chunk, features: bool = True, waveforms: bool = True) -> SpikeBatch:
        """The spikes of ``chunk`` (only those whose peak lies inside it: chunks never share a
        spike). ``waveforms=False``: amplitudes only (what localization needs), no (n, T, K)
        windows."""
        held = self.cache.get(chunk, remove=self.last_pass) if self.cache is not None else None
        traces, first, detected = held if held is not None else (*self._read(chunk), None)
        batch = self.batch_in(traces, first, chunk, features, waveforms, detected=detected)
        if held is None and self.cache is not None and not self.last_pass:
            self.cache.put(chunk, traces, first, batch.peaks.copy() if self.peaks is None else None)
        return batch

    def _read(self, chunk: Chunk) -> tuple[np.ndarray, int]:
        """``chunk``'s traces with the geometry's margin on both sides, and their first sample."""
        margin = self.counts.margin
        traces, first = read_chunk(self._open(), chunk, margin)
        # pad the recording's own edges with zeros so that every window fits
        pad_left = margin - (chunk.start - first)
        pad_right = margin - (first + len(traces) - chunk.end)
        if pad_left or pad_right:
            traces = np.pad(traces, ((pad_left, pad_right), (0, 0)))
            first -= pad_left
        return traces, first

    def batch_in(
        self,
        traces: np.ndarray,
        first: int,
        chunk: Chunk,
        features: bool = True,
        waveforms: bool = True,
        threshold: float | None = None,
        detected: np.ndarray | None = None,
    ) -> SpikeBatch:
        """``batch`` on traces already read (T, C), whose first row is sample ``first`` and which
        hold ``chunk`` with the counts' margin on both sides (e.g. a chunk with spikes peeled
        off).
        ``threshold``: detect at this many noise levels instead of ``params.detect_threshold``;
        ``detected``: the peaks an earlier pass detected on these traces (no detection again)."""
        counts = self.counts
        lo, hi = chunk.start - first, chunk.end - first
        order = None
        if self.peaks is None and detected is not None:
            batch_peaks = detected.copy()
            rows = batch_peaks["sample_index"] - first
        elif self.peaks is None:
            signal = (
                traces
                if self.matched_filter is None
                else -self.matched_filter.score(traces, self.noise)
            )
            thresholds = (
                self.thresholds
                if threshold is None
                else self.thresholds * np.float32(threshold / self.params.detect_threshold)
            )
            rows, channels = detect_chunk(
                signal, thresholds, self.detect_neighbours, counts.sweep, lo, hi
            )
            batch_peaks = np.zeros(len(rows), PEAK_DTYPE)
            batch_peaks["sample_index"] = rows + first
            batch_peaks["channel_index"] = channels
            batch_peaks["segment_index"] = chunk.segment_index
            batch_peaks["amplitude"] = traces[rows, channels]
        else:
            seg_lo, seg_hi = np.searchsorted(
                self.sorted_peaks["segment_index"], [chunk.segment_index, chunk.segment_index + 1]
            )
            samples = self.sorted_peaks["sample_index"][seg_lo:seg_hi]
            i0, i1 = seg_lo + np.searchsorted(samples, [chunk.start, chunk.end])
            selected = np.arange(i0, i1)
            batch_peaks = self.sorted_peaks[selected].copy()
            order = self.sort[selected]
            rows = batch_peaks["sample_index"] - first
            batch_peaks["amplitude"] = traces[rows, batch_peaks["channel_index"]]
        if features:
            return _features(
                traces,
                rows,
                batch_peaks,
                order,
                self.neighbourhood,
                counts,
                self.amplitudes,
                waveforms,
                first,
            )
        return SpikeBatch(batch_peaks, batch_peaks["channel_index"], None, None, order)


def scan(
    recording,
    consume: Callable[[SpikeBatch], dict],
    *,
    params: Params,
    neighbourhood: Neighbourhood,
    noise: np.ndarray,
    peaks: np.ndarray | None = None,
    matched_filter: MatchedFilter | None = None,
    amplitudes: AmplitudeReader | None = None,
    chunks: list[Chunk] | None = None,
    progress: bool = True,
    desc: str = "scan",
    features: bool = True,
    concatenate: bool = True,
) -> dict | list[dict]:
    """Run ``consume`` on every chunk's SpikeBatch, in this process (chunks in parallel threads:
    ``consume`` must not share mutable state); concatenate what it returns per spike.

    With ``peaks`` (PEAK_DTYPE) no detection happens and the result is in the caller's order.
    With ``features=False`` batches carry only peaks (centre = peak channel, no waveforms).
    With ``concatenate=False`` the list of what ``consume`` returned, chunk by chunk (chunks
    without spikes left out).
    """
    from .runners import LocalRunner

    scanner = Scanner(recording, params, neighbourhood, noise, peaks, matched_filter, amplitudes)
    chunks = chunks if chunks is not None else scanner.chunks()

    def work(chunk):
        batch = scanner.batch(chunk, features)
        return consume(batch) if concatenate or len(batch.peaks) else None

    # chunks in a thread pool (as the pipeline's passes), results in chunk order
    found = dict(
        LocalRunner().map(work, chunks, list(range(len(chunks))), desc=desc, progress=progress)
    )
    parts = [found[i] for i in range(len(chunks)) if found[i] is not None]
    return concatenate_parts(parts, peaks is not None) if concatenate else parts


def _features(
    traces,
    rows,
    peaks,
    order,
    neighbourhood,
    counts,
    reader: AmplitudeReader,
    with_waveforms: bool = True,
    first: int = 0,
) -> SpikeBatch:
    """Neighbourhood waveforms and amplitudes around each peak's channel. Detected peaks are
    already the largest channel within the detection radius; caller-given peaks keep their
    channel (honoured one to one)."""
    centre = peaks["channel_index"].astype(np.int64)
    if with_waveforms:
        waveforms = gather_windows(
            traces, rows, neighbourhood.index[centre], counts.before, counts.after
        )
        amplitudes = reader.of_windows(waveforms)
    else:
        waveforms = None
        amplitudes = reader.at(traces, rows, neighbourhood.index[centre])
    return SpikeBatch(peaks, centre, waveforms, amplitudes, order, traces, rows, reader, first)


def concatenate_parts(parts: list[dict], reorder: bool = False) -> dict:
    """Per-spike arrays of chunk results joined in chunk order; with ``reorder`` put back in
    the caller's peak order (the parts' ``order``)."""
    keys = parts[0].keys() if parts else []
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    if reorder and "order" in out:
        # back to the caller's peak order
        inverse = np.empty_like(out["order"])
        inverse[out["order"]] = np.arange(len(out["order"]))
        out = {k: v[inverse] for k, v in out.items()}
    return out
