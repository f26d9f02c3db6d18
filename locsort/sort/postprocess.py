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


def assign_units(
    samples: np.ndarray, proba: torch.Tensor, threshold: float, refractory: int
) -> tuple[np.ndarray, np.ndarray]:
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
                units[rows], scores[rows] = assign_units(
                    samples[rows],
                    proba[torch.as_tensor(rows, device=proba.device)],
                    threshold,
                    refractory,
                )
        return units, scores
    # ties between equal probabilities go to the earlier candidate
    tie_break = torch.arange(n, device=proba.device, dtype=proba.dtype) * 1e-7 / max(n, 1)
    value = torch.where(keep, score - tie_break, torch.zeros_like(score))
    grid = torch.zeros(num_units, span, device=proba.device, dtype=proba.dtype)
    flat = unit * span + (times - t0)
    grid.view(-1).scatter_reduce_(0, flat, value, reduce="amax")
    pooled = F.max_pool1d(grid[None], kernel_size=2 * refractory + 1, stride=1, padding=refractory)[
        0
    ]
    local_max = pooled.view(-1)[flat] <= value
    chosen = keep & local_max
    units = torch.where(chosen, unit, torch.full_like(unit, -1))
    return units.cpu().numpy().astype(np.int64), score.cpu().numpy().astype(np.float32)


def drop_border_duplicates(
    segment: np.ndarray, samples: np.ndarray, units: np.ndarray, refractory: int
) -> np.ndarray:
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


def home_shanks(units: np.ndarray, shanks: np.ndarray, num_units: int | None = None) -> np.ndarray:
    """(num_units,) the shank most of each unit's spikes were detected on (``shanks`` per spike;
    unassigned spikes, -1, count for none); ``num_units`` defaults to the largest unit + 1."""
    assigned = units >= 0
    size = int(units.max(initial=-1)) + 1 if num_units is None else num_units
    counts = np.zeros((size, int(shanks.max(initial=0)) + 1), np.int64)
    np.add.at(counts, (units[assigned], shanks[assigned]), 1)
    return counts.argmax(axis=1)


def on_one_shank(units: np.ndarray, shanks: np.ndarray) -> np.ndarray:
    """Units with each unit's spikes off its own shank (``home_shanks``) set to -1: no spike
    reaches across shanks, so those are not its."""
    units = units.copy()
    assigned = np.flatnonzero(units >= 0)
    if not len(assigned) or shanks.max(initial=0) == 0:
        return units
    home = home_shanks(units, shanks)
    units[assigned[shanks[assigned] != home[units[assigned]]]] = -1
    return units


def duplicate_units(sorting, min_shared: float, max_lag_ms: float) -> list:
    """Ids of units that repeat another unit: at least ``min_shared`` of their spikes coincide
    (within ``max_lag_ms``) with the other's, which keeps more spikes. A spike that reaches
    channels beyond the detection radius a little later is a second candidate there, and the
    network can learn those late copies as a unit of their own, a false-positive unit that
    repeats a true one's spikes a fraction of a millisecond later (docs/design-decisions.md,
    § Neural sorter). SpikeInterface's ``remove_redundant_units`` finds the pairs."""
    from spikeinterface.curation import remove_redundant_units

    if len(sorting.unit_ids) < 2:
        return []
    # SpikeInterface only examines pairs whose agreement (coincidences / union) reaches 0.2 by
    # default; a small copy of a large unit stays below that (the union is mostly the large
    # unit's own spikes), so every pair with a coincidence is examined
    kept = remove_redundant_units(
        sorting,
        align=False,
        remove_strategy="max_spikes",
        duplicate_threshold=min_shared,
        delta_time=max_lag_ms,
        agreement_threshold=1e-9,
    )
    return sorted(set(sorting.unit_ids.tolist()) - set(kept.unit_ids.tolist()))


def repeated_unit_spikes(
    times: np.ndarray,
    units: np.ndarray,
    sampling_frequency: float,
    min_shared: float,
    max_lag_ms: float,
) -> np.ndarray:
    """(n,) bool: the spikes of units that repeat another (``duplicate_units``), for clusters of
    spikes at ``times`` (samples, one time axis) with ``units`` (-1: none)."""
    from spikeinterface.core import NumpySorting

    keep = np.flatnonzero(units >= 0)
    if len(keep) == 0:
        return np.zeros(len(units), bool)
    order = keep[np.argsort(times[keep], kind="stable")]
    sorting = NumpySorting.from_samples_and_labels(
        [times[order]], [units[order]], sampling_frequency
    )
    return np.isin(units, duplicate_units(sorting, min_shared, max_lag_ms))


COPY_JITTER = 2  # samples: a copy's lag to its source spike varies by this much either way
COPY_MIN_COUNT = 10  # fewer lagged coincidences than this are never called copies
COPY_MIN_Z = 5.0  # ... nor are counts within this many Poisson SDs of what independent units give


def lagged_copy_spikes(
    segments: np.ndarray,
    samples: np.ndarray,
    units: np.ndarray,
    amplitudes: np.ndarray,
    sampling_frequency: float,
    num_samples: int,
    max_lag_ms: float,
    min_share: float,
) -> np.ndarray:
    """(n,) bool: spikes that are another unit's spike detected again, to be removed.

    A large spike crosses the threshold again on far channels a little later (or earlier), and
    when the network gives that second candidate to a small unit whose spikes look alike there,
    the small unit's spike train holds copies of the large unit's at one fixed lag: a peak of
    their cross-correlogram within ``max_lag_ms``; at the peeling threshold such copies cost
    the affected units accuracy (docs/design-decisions.md, § Peeling). Two neurons do not fire
    at one sub-millisecond lag by chance, so when the peak (``COPY_JITTER`` samples either side)
    holds at least ``min_share`` of the smaller unit's spikes, at least ``COPY_MIN_COUNT`` and
    ``COPY_MIN_Z`` Poisson SDs above chance, the smaller unit's spikes at that lag from the
    larger one's are removed. Smaller: by median |amplitude| (the copy is the
    weaker image of its source). SpikeInterface computes the correlograms of all unit pairs.

    ``segments``, ``samples``, ``units`` (-1: none), ``amplitudes``: per spike (any order);
    ``num_samples``: the recording's total length, for the chance level.
    """
    from spikeinterface.postprocessing import compute_correlograms

    drop = np.zeros(len(units), bool)
    assigned = np.flatnonzero(units >= 0)
    if min_share >= 1.0 or len(assigned) == 0 or len(np.unique(units[assigned])) < 2:
        return drop
    half = int(round(max_lag_ms * sampling_frequency / 1000))
    num_units = int(units[assigned].max()) + 1
    sorting, by_segment = _segment_sorting(segments, samples, units, sampling_frequency)
    # one bin per sample; SpikeInterface's correlogram[j, i, half + lag] counts spikes of j at lag
    # samples after one of i: transposed, [source, copy, half + lag]. The numpy method counts the
    # same as the numba one and needs no compilation, which would cost every new process far
    # more than the counting itself (docs/design-decisions.md, § Execution)
    bin_ms = 1000.0 / sampling_frequency
    correlogram = compute_correlograms(
        sorting, window_ms=2 * half * bin_ms, bin_ms=bin_ms, method="numpy"
    )[0].transpose(1, 0, 2)
    half = correlogram.shape[2] // 2
    width = 2 * COPY_JITTER + 1
    window = correlogram[
        :, :, : correlogram.shape[2] - width + 1
    ].copy()  # counts within +/- COPY_JITTER of each lag
    for shift in range(1, width):
        window += correlogram[:, :, shift : correlogram.shape[2] - width + 1 + shift]
    peak = window.max(axis=2)
    lag = window.argmax(axis=2) + COPY_JITTER - half  # the peak's centre lag, copy after source
    count = np.bincount(units[assigned], minlength=num_units).astype(float)
    by_unit = assigned[np.argsort(units[assigned], kind="stable")]
    median = np.zeros(num_units)
    for unit, rows in zip(
        np.unique(units[by_unit]), np.split(by_unit, np.cumsum(count[count > 0]).astype(int)[:-1])
    ):
        median[unit] = np.median(np.abs(amplitudes[rows]))
    chance = count[:, None] * count[None, :] * width / max(num_samples, 1)
    # i is the source, j the copy: the copy is the weaker unit (ties: the one with fewer spikes)
    weaker = (median[None, :] < median[:, None]) | (
        (median[None, :] == median[:, None]) & (count[None, :] < count[:, None])
    )
    copies = (
        weaker
        & (peak >= COPY_MIN_COUNT)
        & (peak >= min_share * count[None, :])
        & (peak > chance + COPY_MIN_Z * np.sqrt(np.maximum(chance, 1.0)))
    )
    for source, copy in zip(*np.nonzero(copies)):
        for segment_rows in by_segment:
            source_times = samples[segment_rows[units[segment_rows] == source]]
            rows = segment_rows[units[segment_rows] == copy]
            if len(source_times) == 0 or len(rows) == 0:
                continue
            # the copy's spikes within COPY_JITTER of (a source spike + lag)
            expected = samples[rows] - lag[source, copy]
            after = np.searchsorted(source_times, expected - COPY_JITTER, side="left")
            hit = after < len(source_times)
            hit[hit] = source_times[after[hit]] <= expected[hit] + COPY_JITTER
            drop[rows[hit]] = True
    return drop


def without_copies(
    segments: np.ndarray,
    samples: np.ndarray,
    units: np.ndarray,
    amplitudes: np.ndarray,
    sampling_frequency: float,
    num_samples: int,
    *,
    copy_max_lag_ms: float,
    copy_min_share: float,
    duplicate_max_lag_ms: float,
    duplicate_min_shared: float,
) -> np.ndarray:
    """(n,) ``units`` with -1 for spikes at one fixed lag from a larger unit's
    (``lagged_copy_spikes``), then for whole units that repeat another's (``duplicate_units``).
    Spike copies go first: a true unit whose far copies the network gave to a neighbour repeats
    that neighbour's spikes until they are gone, and would be removed whole
    (docs/design-decisions.md, § Neural sorter). A share of 1 turns either test off."""
    units = units.copy()
    if copy_min_share < 1.0:
        units[
            lagged_copy_spikes(
                segments,
                samples,
                units,
                amplitudes,
                sampling_frequency,
                num_samples,
                copy_max_lag_ms,
                copy_min_share,
            )
        ] = -1
    if duplicate_min_shared < 1.0 and np.any(units >= 0):
        sorting, _ = _segment_sorting(segments, samples, units, sampling_frequency)
        removed = duplicate_units(sorting, duplicate_min_shared, duplicate_max_lag_ms)
        units[np.isin(units, removed)] = -1
    return units


def _segment_sorting(segments, samples, units, sampling_frequency):
    """(NumpySorting of the spikes with a unit, unit ids 0..max; each segment's rows of those
    spikes in time order)."""
    from spikeinterface.core import NumpySorting

    assigned = np.flatnonzero(units >= 0)
    by_segment = []
    for segment in range(int(segments.max(initial=0)) + 1):
        rows = assigned[segments[assigned] == segment]
        by_segment.append(rows[np.argsort(samples[rows], kind="stable")])
    sorting = NumpySorting.from_samples_and_labels(
        [samples[r] for r in by_segment],
        [units[r] for r in by_segment],
        sampling_frequency,
        unit_ids=np.arange(int(units.max(initial=-1)) + 1),
    )
    return sorting, by_segment


def _unit_rows(units: np.ndarray) -> dict[int, np.ndarray]:
    """Each unit's rows in ``units`` (-1: none), in row order."""
    labelled = np.flatnonzero(units >= 0)
    order = labelled[np.argsort(units[labelled], kind="stable")]
    ids, starts, sizes = np.unique(units[order], return_index=True, return_counts=True)
    return {int(u): order[s : s + n] for u, s, n in zip(ids, starts, sizes)}


def _centre(rows: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(2,) µm: the median x, y of one unit's spikes at ``rows``."""
    return np.array([np.median(x[rows]), np.median(y[rows])])


DISPLACEMENT_BIN_UM = 2.0  # histogram bins: several across the smallest drift corrected


def merge_motion_pieces(
    units: np.ndarray,
    x: np.ndarray,
    y_registered: np.ndarray,
    displacement: np.ndarray,
    max_distance_um: float,
    max_overlap: float,
    min_spikes: int,
) -> np.ndarray:
    """(n,) units with the pieces of one neuron that motion correction left apart merged (ids
    kept: a merged unit's spikes take the id of the piece it joined; -1 kept).

    Registration by interpolation changes a spike's waveform with the displacement (its channels
    are rebuilt from neighbours), so a neuron can end up as pieces that each hold the spikes of
    one range of displacements: at one registered position, with disjoint displacement
    histograms. Two neurons at one position fire over the same displacements (their firing does
    not follow the probe's motion), so a pair is merged when their median registered positions
    are within ``max_distance_um`` and the overlap of their displacement histograms (sum of the
    smaller share per bin: 1 when alike, 0 when disjoint) is at most ``max_overlap``, most
    disjoint pair first; units with fewer than ``min_spikes`` spikes are left alone
    (docs/design-decisions.md, § Motion)."""
    units = np.asarray(units).copy()
    if not len(units) or units.max() < 1 or max_overlap <= 0:
        return units
    edges = np.arange(
        displacement.min(), displacement.max() + DISPLACEMENT_BIN_UM, DISPLACEMENT_BIN_UM
    )
    if len(edges) < 3:  # the displacement never spans two bins: nothing to tell pieces by
        return units
    rows = {u: r for u, r in _unit_rows(units).items() if len(r) >= min_spikes}
    bins = np.clip(np.digitize(displacement, edges) - 1, 0, len(edges) - 2)

    def histogram(u):
        counts = np.bincount(bins[rows[u]], minlength=len(edges) - 1).astype(float)
        return counts / counts.sum()

    where = {u: _centre(r, x, y_registered) for u, r in rows.items()}
    share = {u: histogram(u) for u in rows}

    def pairs_of(u, others):
        return {
            (min(u, v), max(u, v)): float(np.minimum(share[u], share[v]).sum())
            for v in others
            if v != u and np.linalg.norm(where[u] - where[v]) <= max_distance_um
        }

    pairs = {}
    for u in rows:
        pairs.update(pairs_of(u, [v for v in rows if v > u]))
    while pairs:
        (a, b), overlap = min(pairs.items(), key=lambda item: item[1])
        if overlap > max_overlap:
            break
        units[rows[b]] = a
        rows[a] = np.concatenate([rows[a], rows.pop(b)])
        where[a], share[a] = _centre(rows[a], x, y_registered), histogram(a)
        del where[b], share[b]
        pairs = {pair: value for pair, value in pairs.items() if a not in pair and b not in pair}
        pairs.update(pairs_of(a, list(where)))
    return units


COLLISION_MAX_P = 1e-3  # binomial chance of that many coincidences: few spikes prove nothing


def collision_units(
    segments: np.ndarray,
    samples: np.ndarray,
    units: np.ndarray,
    x: np.ndarray,
    y_registered: np.ndarray,
    sampling_frequency: float,
    num_samples: int,
    *,
    window_ms: float,
    radius_um: float,
    min_excess: float,
) -> list[int]:
    """Units made of two neurons' overlapping spikes: most of their spikes come within
    ``window_ms`` of a spike of another unit centred within ``radius_um``.

    Two nearby neurons firing together give a summed waveform unlike either, and enough such
    collisions form a cluster of their own, which the network then learns as a unit. Independent
    neurons coincide by chance only, at a fraction ``c = 1 - exp(-rate * window)`` set by the
    neighbours' summed rate; a unit is a collision unit when the fraction ``f`` of its spikes
    with a neighbour's spike that near exceeds chance by ``(f - c) / (1 - c) >= min_excess``
    (1: never) and a binomial test puts that count beyond chance (docs/design-decisions.md,
    § Clustering). ``num_samples``: the recording's total samples, for the rates."""
    rows = _unit_rows(units)
    if min_excess >= 1.0 or not rows:
        return []
    from scipy.stats import binom

    # one time axis for every segment, with gaps wider than the window between them
    window = int(round(window_ms * sampling_frequency / 1000.0))
    offset = segments.astype(np.int64) * (int(samples.max()) + 2 * window + 2)
    times = samples.astype(np.int64) + offset
    trains = [np.sort(times[r]) for r in rows.values()]
    centres = np.array([_centre(r, x, y_registered) for r in rows.values()])
    close = np.linalg.norm(centres[:, None] - centres[None], axis=2) <= radius_um
    np.fill_diagonal(close, False)
    collided = []
    for u, train, near in zip(rows, trains, close):
        if not near.any():
            continue
        others = np.sort(np.concatenate([trains[v] for v in np.flatnonzero(near)]))
        hit = np.searchsorted(others, train + window, side="right") > np.searchsorted(
            others, train - window, side="left"
        )
        chance = -np.expm1(-len(others) / num_samples * (2 * window + 1))
        count = int(hit.sum())
        excess = (count / len(train) - chance) / (1.0 - chance)
        if excess >= min_excess and binom.sf(count - 1, len(train), chance) <= COLLISION_MAX_P:
            collided.append(u)
    return collided
