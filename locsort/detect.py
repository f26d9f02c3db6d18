"""Candidate spikes: negative peaks below -threshold x noise that are the largest within a
small spatio-temporal neighbourhood ("locally exclusive").

One comparison pass over the chunk finds the samples below threshold (a small fraction);
every further test runs only on those, as tensor gathers, so the cost is one read of the
traces plus work proportional to the number of threshold crossings.
"""

from __future__ import annotations

import warnings

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
    """Peaks in ``traces[lo:hi]`` (rows and channels, in time order), ``traces`` (T, C) in µV.

    A sample (t, c) is a peak when traces[t, c] <= -thresholds[c], it is the first minimum of
    channel c within +/- ``sweep`` samples, and no channel in ``neighbours[c]`` (C, M; -1
    padded) goes further negative within that window (ties go to the lower channel index).
    ``lo - sweep`` and ``hi + sweep`` must lie inside ``traces`` (the chunk margin).
    """
    x = torch.from_numpy(np.asarray(traces, dtype=np.float32))
    below = x[lo:hi] <= -torch.from_numpy(np.asarray(thresholds, dtype=np.float32))
    t, c = below.nonzero(as_tuple=True)
    if len(t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = t + lo
    value = x[t, c]
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
