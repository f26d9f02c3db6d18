"""Network outputs -> spike trains, with tensor operations over all units and times at once
(no Python loop over spikes or units).

Per chunk, the network gives every candidate event a probability per unit. A candidate is a
spike of its most probable unit when the probabilities add up past the threshold (cross-unit
duplicates: one candidate is one spike). One spike seen as two candidates (on channels
farther apart than the detection radius, or a few samples apart) would count twice, so per
unit only the local maximum of the probability within +/- ``refractory`` samples is kept:
the probabilities are scattered on a dense (units x time) grid and compared with their
max-pooled grid, E-Sort's local-maximum step on the candidates' sparse trace.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

_MAX_GRID = 64_000_000  # units x samples per grid; larger spans are cut in time pieces


def assign_units(samples: np.ndarray, proba: torch.Tensor, threshold: float, refractory: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit per candidate, -1 when rejected; its probability) for candidates at ``samples``
    (n,) of one segment with probabilities ``proba`` (n, U).

    A candidate is a spike when its units' probabilities add up above ``threshold`` (units are
    exclusive, so the sum is the probability that it is anyone's spike), and then belongs to its
    most probable unit: a spike split between two similar units (0.4 each) is kept, which a
    threshold on the largest probability alone would drop."""
    n = len(samples)
    if n == 0 or proba.shape[1] == 0:
        return np.full(n, -1, np.int64), np.zeros(n, np.float32)
    score, unit = proba.max(dim=1)
    keep = proba.sum(dim=1) > threshold
    times = torch.as_tensor(samples, device=proba.device)
    t0 = int(times.min())
    span = int(times.max()) - t0 + 1
    num_units = proba.shape[1]
    if num_units * span > _MAX_GRID:  # e.g. a long sparse segment: process it in time pieces
        order = np.argsort(samples, kind="stable")
        pieces = np.array_split(order, int(np.ceil(num_units * span / _MAX_GRID)) + 1)
        units, scores = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        for rows in pieces:
            if len(rows):
                units[rows], scores[rows] = assign_units(samples[rows], proba[torch.as_tensor(rows, device=proba.device)], threshold, refractory)
        return units, scores
    # ties between equal probabilities go to the earlier candidate
    tie_break = torch.arange(n, device=proba.device, dtype=proba.dtype) * 1e-7 / max(n, 1)
    value = torch.where(keep, score - tie_break, torch.zeros_like(score))
    grid = torch.zeros(num_units, span, device=proba.device, dtype=proba.dtype)
    flat = unit * span + (times - t0)
    grid.view(-1).scatter_reduce_(0, flat, value, reduce="amax")
    pooled = F.max_pool1d(grid[None], kernel_size=2 * refractory + 1, stride=1, padding=refractory)[0]
    local_max = pooled.view(-1)[flat] <= value
    chosen = keep & local_max
    units = torch.where(chosen, unit, torch.full_like(unit, -1))
    return units.cpu().numpy().astype(np.int64), score.cpu().numpy().astype(np.float32)


def drop_border_duplicates(segment: np.ndarray, samples: np.ndarray, units: np.ndarray, refractory: int) -> np.ndarray:
    """Units with repeats of one unit closer than ``refractory`` samples removed (set to -1),
    keeping the first: what the per-chunk local maximum cannot see across a chunk border."""
    units = units.copy()
    assigned = np.flatnonzero(units >= 0)
    if len(assigned) < 2:
        return units
    order = assigned[np.lexsort((samples[assigned], segment[assigned], units[assigned]))]
    same = (units[order][1:] == units[order][:-1]) & (segment[order][1:] == segment[order][:-1])
    close = same & (np.diff(samples[order]) <= refractory)
    units[order[1:][close]] = -1
    return units


def duplicate_units(sorting, min_shared: float, max_lag_ms: float) -> list:
    """Ids of units that repeat another unit: at least ``min_shared`` of their spikes coincide
    (within ``max_lag_ms``) with the other's, which keeps more spikes. A spike that reaches
    channels beyond the detection radius a little later is a second candidate there, and the
    network can learn those late copies as a unit of their own (on the 128-channel MEArec
    recording, two false-positive units repeated true units' spikes 0.4-0.7 ms later).
    SpikeInterface's ``remove_redundant_units`` finds the pairs."""
    from spikeinterface.curation import remove_redundant_units

    if len(sorting.unit_ids) < 2:
        return []
    # SpikeInterface only examines pairs whose agreement (coincidences / union) reaches 0.2 by
    # default; a small copy of a large unit stays below that (np128: 29 of a 31-spike cluster's
    # spikes repeat a 183-spike one, agreement 0.16), so every pair with a coincidence is examined
    kept = remove_redundant_units(sorting, align=False, remove_strategy="max_spikes", duplicate_threshold=min_shared,
                                  delta_time=max_lag_ms, agreement_threshold=1e-9)
    return sorted(set(sorting.unit_ids.tolist()) - set(kept.unit_ids.tolist()))


def repeated_unit_spikes(times: np.ndarray, units: np.ndarray, sampling_frequency: float, min_shared: float,
                         max_lag_ms: float) -> np.ndarray:
    """(n,) bool: the spikes of units that repeat another (``duplicate_units``), for clusters of
    spikes at ``times`` (samples, one time axis) with ``units`` (-1: none)."""
    from spikeinterface.core import NumpySorting

    keep = np.flatnonzero(units >= 0)
    if len(keep) == 0:
        return np.zeros(len(units), bool)
    order = keep[np.argsort(times[keep], kind="stable")]
    sorting = NumpySorting.from_samples_and_labels([times[order]], [units[order]], sampling_frequency)
    return np.isin(units, duplicate_units(sorting, min_shared, max_lag_ms))
