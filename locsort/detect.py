"""Candidate spikes: negative peaks below -threshold x noise that are the largest within a
small spatio-temporal neighbourhood ("locally exclusive").

One comparison pass over the chunk finds the samples below threshold (a small fraction);
every further test runs only on those, as tensor gathers, so the cost is one read of the
traces plus work proportional to the number of threshold crossings.

Two signals can be thresholded (``constants.detect_method``):

- "peak": the traces themselves, in noise SDs of each channel.
- "matched" (default): each channel's correlation with a spike prototype (the mean shape of
  the recording's own large spikes), in noise SDs of that correlation. A spike spans ~1 ms
  while band-passed noise decorrelates within a few samples, so the matched filter lifts a
  small spike far above the noise: low-SNR units that cross the threshold with only a minority
  of their spikes as peaks cross it with nearly all of them after the filter
  (docs/design-decisions.md, § Detection). SpyKING CIRCUS 2 detects the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

# traces memory-mapped read-only are only read here, never written
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def detect_chunk(
    traces: np.ndarray,
    thresholds: np.ndarray,
    neighbours: np.ndarray,
    sweep: int,
    lo: int,
    hi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Peaks in ``traces[lo:hi]`` (rows and channels, in time order), ``traces`` (T, C) in µV
    (or a matched-filter score negated, see MatchedFilter).

    A sample (t, c) is a peak when traces[t, c] <= -thresholds[c], it is the first minimum of
    channel c within +/- ``sweep`` samples, and no channel in ``neighbours[c]`` (C, M; -1
    padded) goes further negative within that window (ties go to the lower channel index).
    ``lo - sweep`` and ``hi + sweep`` must lie inside ``traces`` (the chunk margin).
    """
    x = (
        traces
        if isinstance(traces, torch.Tensor)
        else torch.from_numpy(np.asarray(traces, dtype=np.float32))
    )
    below = x[lo:hi] <= -torch.from_numpy(np.asarray(thresholds, dtype=np.float32))
    t, c = below.nonzero(as_tuple=True)
    if len(t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = t + lo
    value = x[t, c]
    # only samples below both time neighbours can be the first minimum of their window:
    # drop the rest before the wider gathers (same result, less work)
    keep = (value < x[t - 1, c]) & (value <= x[t + 1, c])
    t, c, value = t[keep], c[keep], value[keep]
    offsets = torch.arange(-sweep, sweep + 1)
    window = t[:, None] + offsets[None, :]  # (n, W)
    own = x[window, c[:, None]]
    # the first minimum of its own channel within the window
    keep = (value <= own.min(dim=1).values) & (value < own[:, :sweep].min(dim=1).values)
    t, c, value, window = t[keep], c[keep], value[keep], window[keep]
    nb = torch.from_numpy(neighbours)[c]  # (n, M)
    nb_min = x[window[:, :, None], nb.clamp(min=0)[:, None, :]].min(dim=1).values  # (n, M)
    other = (nb >= 0) & (nb != c[:, None])
    beaten = other & ((nb_min < value[:, None]) | ((nb_min == value[:, None]) & (nb < c[:, None])))
    keep = ~beaten.any(dim=1)
    t, c = t[keep], c[keep]
    order = torch.argsort(t * x.shape[1] + c)  # time order, as SpikeInterface's peaks
    return t[order].numpy().astype(np.int64), c[order].numpy().astype(np.int64)


@dataclass
class MatchedFilter:
    """Each channel's traces correlated with one spike prototype, in SDs of that score.

    prototype : (L,) float32, unit norm, the mean spike shape (trough negative)
    trough : index of the trough in ``prototype``: the score at t compares the prototype's
        trough with sample t, so score peaks sit at spike troughs
    score_sd : (C,) float32, noise SD of each channel's score (MAD of the score of traces in
        noise units, on random slices of the recording)
    """

    prototype: np.ndarray
    trough: int
    score_sd: np.ndarray

    @property
    def reach(self) -> int:
        """Samples on either side of t that the score at t reads."""
        return max(self.trough, len(self.prototype) - 1 - self.trough)

    def score(self, traces, noise: np.ndarray) -> torch.Tensor:
        """(T, C) score of ``traces`` (T, C) µV: positive where a spike-like trough is (zero
        beyond the traces' ends). By FFT, channel by channel along time (scipy's FFT in one
        thread: chunks already run in parallel), much faster than a direct convolution."""
        from scipy import fft

        x = np.ascontiguousarray(
            (np.asarray(traces, dtype=np.float32) / np.asarray(noise, dtype=np.float32)).T
        )
        length, taps = x.shape[1], len(self.prototype)
        size = fft.next_fast_len(length + taps - 1, real=True)
        kernel = fft.rfft(self.prototype[::-1], n=size)
        full = fft.irfft(
            fft.rfft(x, n=size, axis=1, workers=1) * kernel[None, :], n=size, axis=1, workers=1
        )
        # full[i] correlates the prototype with x[i - taps + 1 : i + 1]: its trough meets t at
        # i = t + taps - 1 - trough
        first = taps - 1 - self.trough
        score = full[:, first : first + length] / self.score_sd[:, None]
        return torch.from_numpy(np.ascontiguousarray(score.T, dtype=np.float32))


def peaks_in_slices(
    slices: list[np.ndarray],
    noise: np.ndarray,
    neighbours: np.ndarray,
    threshold: float,
    sweep: int,
    before: int,
    after: int,
):
    """(traces, rows, channels) per slice (T, C) µV: its locally exclusive peaks beyond
    ``threshold`` noise SDs, at least ``before`` / ``after`` samples from its ends: clear spikes
    to learn shapes from (slices too short are skipped)."""
    for traces in slices:
        if len(traces) <= 2 * (before + after + sweep):
            continue
        lo, hi = before + sweep, len(traces) - after - sweep - 1
        rows, channels = detect_chunk(traces, threshold * noise, neighbours, sweep, lo, hi)
        if len(rows):
            yield traces, rows, channels


def fit_matched_filter(
    slices: list[np.ndarray],
    noise: np.ndarray,
    neighbours: np.ndarray,
    threshold: float,
    sweep: int,
    before: int,
    after: int,
    min_spikes: int = 30,
) -> MatchedFilter | None:
    """A MatchedFilter from random slices (T, C) µV of the preprocessed recording: the prototype
    is the mean trough-normalized waveform of the peaks beyond ``threshold`` noise SDs on their
    own channel (``before``/``after`` samples around the trough). None with fewer than
    ``min_spikes`` such peaks: too little to learn a shape from (the caller detects peaks
    instead)."""
    shapes = []
    for traces, rows, channels in peaks_in_slices(
        slices, noise, neighbours, threshold, sweep, before, after
    ):
        window = traces[rows[:, None] + np.arange(-before, after + 1)[None, :], channels[:, None]]
        shapes.append(window / -window[:, before : before + 1])
    if not shapes or sum(len(s) for s in shapes) < min_spikes:
        return None
    prototype = np.concatenate(shapes).mean(0)
    prototype = (prototype / np.linalg.norm(prototype)).astype(np.float32)
    unit = MatchedFilter(prototype, before, np.ones(len(noise), np.float32))
    # MAD per slice, averaged (as the noise levels); every 4th sample: the score is smooth over
    # ~10 samples, so this loses little and makes the medians 4 x cheaper
    mads = []
    for traces in slices[:10]:
        if len(traces) > 2 * unit.reach + 4:
            score = unit.score(traces, noise).numpy()[unit.reach : len(traces) - unit.reach : 4]
            mads.append(np.median(np.abs(score - np.median(score, axis=0)), axis=0))
    if not mads:
        return None
    score_sd = np.mean(mads, axis=0) / 0.6744897501960817
    return MatchedFilter(prototype, before, np.maximum(score_sd, 1e-6).astype(np.float32))
