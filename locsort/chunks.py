"""Time chunks with margins: how every pass over the traces is cut so that memory depends on
the chunk size, not on the recording's duration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LocsortError
from .io import describe_files


@dataclass(frozen=True)
class Chunk:
    segment_index: int
    start: int  # first sample owned by this chunk
    end: int  # one past the last sample owned by this chunk


def make_chunks(recording, chunk_size: int) -> list[Chunk]:
    chunks = []
    for segment in range(recording.get_num_segments()):
        n = recording.get_num_samples(segment)
        for start in range(0, n, chunk_size):
            chunks.append(Chunk(segment, start, min(start + chunk_size, n)))
    return chunks


def spread_chunks(chunks: list[Chunk], count: int) -> list[Chunk]:
    """``count`` chunks evenly spread over the recording (all of them if there are fewer)."""
    if len(chunks) <= count:
        return list(chunks)
    picks = np.unique(np.linspace(0, len(chunks) - 1, count).round().astype(int))
    return [chunks[i] for i in picks]


def read_chunk(recording, chunk: Chunk, margin: int) -> tuple[np.ndarray, int]:
    """Traces of ``chunk`` with up to ``margin`` samples on each side, as float32 (T, C), and
    the sample index of the first row. NaN/Inf samples are an error naming where they are."""
    n = recording.get_num_samples(chunk.segment_index)
    first = max(chunk.start - margin, 0)
    last = min(chunk.end + margin, n)
    try:
        traces = recording.get_traces(
            segment_index=chunk.segment_index, start_frame=first, end_frame=last
        )
        traces = np.asarray(traces, dtype=np.float32)
    except Exception as exc:  # a file removed, truncated or unreadable while the run goes on
        raise LocsortError(
            f"cannot read {describe_files(recording)} at segment {chunk.segment_index}, "
            f"samples {first}..{last}: {exc}; was the file moved, truncated or changed during the "
            "run?"
        ) from exc
    if traces.shape[0] != last - first:
        raise LocsortError(
            f"{describe_files(recording)} ended early: {traces.shape[0]} samples read at segment "
            f"{chunk.segment_index}, sample {first}, where {last - first} were expected "
            "(truncated file?)"
        )
    if traces.size and not (
        np.isfinite(traces.min()) and np.isfinite(traces.max())
    ):  # NaN propagates; SIMD reductions, no boolean copy
        row = int(np.flatnonzero(~np.isfinite(traces).all(axis=1))[0])
        raise LocsortError(
            f"the recording has NaN or Inf samples (segment {chunk.segment_index}, "
            f"sample {first + row}); "
            "clean or interpolate them before sorting"
        )
    return traces, first
