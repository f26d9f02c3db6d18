"""Candidate spikes: negative peaks below -threshold x noise that are the largest within a
small spatio-temporal neighbourhood ("locally exclusive"), computed with tensor operations
over a whole chunk at once."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def detect_chunk(
    traces: np.ndarray,
    thresholds: np.ndarray,
    neighbours: np.ndarray,
    sweep: int,
    lo: int,
    hi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Peaks in ``traces[lo:hi]`` (rows and channels), ``traces`` being (T, C) float32 µV.

    A sample (t, c) is a peak when -traces[t, c] >= thresholds[c], it is the first maximum of
    -traces[:, c] within +/- ``sweep`` samples, and no channel in ``neighbours[c]`` (C, M;
    -1 padded) goes further negative within that window (ties go to the lower channel).
    """
    # (C, T) contiguous: max_pool1d and the comparisons then stream through memory
    x = torch.from_numpy(np.ascontiguousarray(traces.T)).neg()  # never in place: may share memory with traces
    window_max = F.max_pool1d(x.unsqueeze(0), 2 * sweep + 1, stride=1, padding=sweep)[0]
    candidate = x[:, lo:hi] >= torch.from_numpy(thresholds)[:, None]
    candidate &= x[:, lo:hi] == window_max[:, lo:hi]
    c, t = candidate.nonzero(as_tuple=True)
    t = t + lo
    if len(t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    value = x[c, t]
    # plateaus: keep only the first sample of equal maxima
    earlier = (t[:, None] - torch.arange(1, sweep + 1)[None, :]).clamp(min=0)
    keep = value > x[c[:, None], earlier].max(dim=1).values
    nb = torch.from_numpy(neighbours)[c]
    nb_max = window_max[nb.clamp(min=0), t[:, None]]
    other = (nb >= 0) & (nb != c[:, None])
    beaten = other & ((nb_max > value[:, None]) | ((nb_max == value[:, None]) & (nb < c[:, None])))
    keep &= ~beaten.any(dim=1)
    t, c = t[keep], c[keep]
    order = torch.argsort(t * x.shape[0] + c)  # time order, as SpikeInterface's peaks
    t, c = t[order], c[order]
    return t.numpy().astype(np.int64), c.numpy().astype(np.int64)
