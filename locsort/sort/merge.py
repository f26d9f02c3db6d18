"""Merging over-split clusters before they become training labels.

HDBSCAN on (location, amplitude, PCs) cuts one neuron in two when its spikes' locations or
amplitudes spread (drift, bursts, noisy posteriors). Such pieces have the same waveform on the
same channels; two different neurons almost never do. So each cluster gets a template — its
mean waveform (noise units) on every probe contact its spikes' neighbourhoods cover — and the
most similar pair of clusters is merged while their templates agree (cosine similarity over the
contacts both cover) and their sizes do not differ by more than ``max_amplitude_ratio``.
Two neurons can still have templates that agree (two cells at the same depth on either side of
a single-column probe), but not a refractory period: with ``Refractory`` given, a pair whose
spikes come within it of each other more often than one neuron's pieces can is never merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cluster import renumber

# SpikeInterface's auto-merge preset for its cross-contamination test: coincidences closer than
# the censored period are one spike seen twice, and a pair is two neurons when its
# cross-contamination is above the limit at this p-value
_CENSORED_MS = 0.3
_CROSS_CONTAMINATION_LIMIT = 0.1
_P_VALUE = 0.2


@dataclass(frozen=True)
class Refractory:
    """Each clustered spike's time and the span they were drawn from, to tell whether two
    clusters can be one neuron's pieces (none of whose spikes come within ``period_ms`` of each
    other) or are two neurons firing independently.

    times : (n,) samples, one per label; sampling_frequency : Hz; duration : samples the spikes
    were drawn from (a random thinning of them leaves the test unbiased); period_ms : the
    refractory period.
    """

    times: np.ndarray
    sampling_frequency: float
    duration: int
    period_ms: float

    def two_neurons(self, labels: np.ndarray, group_a, group_b) -> bool:
        """True when a piece of ``group_a`` and one of ``group_b`` (labels in ``labels``) are
        significantly cross-contaminated (SpikeInterface's ``estimate_cross_contamination``):
        one neuron's pieces are all compatible, and a small impure piece merged first must not
        hide the conflict of the pieces it joins."""
        trains = {u: np.sort(self.times[labels == u]) for u in [*group_a, *group_b]}
        return any(self._conflict(trains[a], trains[b]) for a in group_a for b in group_b)

    def _conflict(self, train_a: np.ndarray, train_b: np.ndarray) -> bool:
        from spikeinterface.curation.auto_merge import estimate_cross_contamination

        larger, smaller = sorted([train_a, train_b], key=len, reverse=True)
        if len(smaller) < 2:
            return False
        _, p_value = estimate_cross_contamination(
            larger.astype(np.int64),
            smaller.astype(np.int64),
            self.sampling_frequency,
            int(self.duration),
            (_CENSORED_MS, self.period_ms),
            limit=_CROSS_CONTAMINATION_LIMIT,
        )
        return bool(p_value < _P_VALUE)


def unit_templates(
    labels: np.ndarray, windows, num_units: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, P, T) mean waveforms on the P contact positions the windows cover, (U, P) the number
    of spikes that contributed to each (0: the unit never reaches that contact), and (P, 2)
    those positions (µm)."""
    from scipy.sparse import csr_matrix

    keep = labels >= 0
    real = windows.real[keep]
    absolute = (
        windows.centre_xy[keep][:, None, :] + windows.slot_xy[keep]
    )  # (n, K, 2) µm on the probe
    # contacts by position to 0.1 µm; one integer key per position (np.unique over rows is far
    # slower)
    tenths = np.round(absolute[real].astype(np.float64) * 10).astype(np.int64)
    keys, contact = np.unique(
        tenths[:, 0] * (1 << 32) + (tenths[:, 1] + (1 << 31)), return_inverse=True
    )
    positions = np.column_stack([keys // (1 << 32), keys % (1 << 32) - (1 << 31)]) / 10.0
    unit = np.repeat(labels[keep][:, None], real.shape[1], axis=1)[real]
    num_contacts = len(positions)
    flat = unit * num_contacts + contact.ravel()
    samples = windows.waveforms[keep].transpose(0, 2, 1)[real].astype(np.float64)  # (pairs, T)
    # sum per (unit, contact) as one sparse product (torch's index_add_ dominated split_units)
    onehot = csr_matrix(
        (np.ones(len(flat)), (flat, np.arange(len(flat)))),
        shape=(num_units * num_contacts, len(flat)),
    )
    counts = np.bincount(flat, minlength=num_units * num_contacts).astype(np.float64)
    templates = (onehot @ samples) / np.maximum(counts, 1)[:, None]
    return (
        templates.reshape(num_units, num_contacts, -1),
        counts.reshape(num_units, num_contacts),
        positions,
    )


def merge_similar_units(
    labels: np.ndarray,
    windows,
    min_similarity: float = 0.95,
    max_amplitude_ratio: float = 1.5,
    min_coverage: int = 5,
    max_distance_um: float = 60.0,
    refractory: Refractory | None = None,
) -> tuple[np.ndarray, int]:
    """Labels with over-split units merged (renumbered 0..U'-1, -1 kept) and the number of
    merges. Only units whose largest contacts are within ``max_distance_um`` are compared;
    ``min_coverage``: spikes a contact needs in both units to be compared there; with
    ``refractory``, pairs that are two neurons by their spike times are not merged."""
    labels = np.asarray(labels).copy()
    num_units = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    if num_units < 2:
        return labels, 0
    templates, counts, positions = unit_templates(labels, windows, num_units)
    energy = (templates**2).sum(axis=2)  # (U, P)
    peak = positions[np.argmax(energy, axis=1)]
    near = np.linalg.norm(peak[:, None] - peak[None], axis=-1) <= max_distance_um
    pairs = {
        (a, b): _similarity(templates, counts, a, b, min_coverage, max_amplitude_ratio)
        for a, b in zip(*np.nonzero(np.triu(near, 1)))
    }
    alive = np.ones(num_units, bool)
    pieces, members = labels.copy(), {u: [u] for u in range(num_units)}
    merges = 0
    while pairs:
        (a, b), best = max(pairs.items(), key=lambda item: item[1])
        if best < min_similarity:
            break
        if refractory is not None and refractory.two_neurons(pieces, members[a], members[b]):
            pairs[(a, b)] = -1.0
            continue
        # b joins a: spike-weighted templates, per contact; a's similarities are computed again
        total = counts[a] + counts[b]
        templates[a] = (
            templates[a] * counts[a][:, None] + templates[b] * counts[b][:, None]
        ) / np.maximum(total, 1)[:, None]
        counts[a] = total
        members[a] += members.pop(b)
        alive[b] = False
        labels[labels == b] = a
        merges += 1
        partners = {u for pair in pairs if a in pair or b in pair for u in pair} - {a, b}
        pairs = {pair: value for pair, value in pairs.items() if a not in pair and b not in pair}
        for u in partners:
            if alive[u]:
                pairs[(min(a, u), max(a, u))] = _similarity(
                    templates, counts, a, u, min_coverage, max_amplitude_ratio
                )
    return renumber(labels), merges


def _similarity(
    templates, counts, a: int, b: int, min_coverage: int, max_amplitude_ratio: float
) -> float:
    """Cosine similarity of two templates over the contacts both cover, or -1 when they are not
    comparable: sizes differ by more than ``max_amplitude_ratio``, or the shared contacts hold
    less than half of either unit's energy (units far apart share little)."""
    covered_a, covered_b = counts[a] >= min_coverage, counts[b] >= min_coverage
    both = covered_a & covered_b
    ta, tb = templates[a][both], templates[b][both]
    norm_a, norm_b = float((ta**2).sum()), float((tb**2).sum())
    own_a, own_b = (
        float((templates[a][covered_a] ** 2).sum()),
        float((templates[b][covered_b] ** 2).sum()),
    )
    if min(norm_a, norm_b) <= 0 or min(norm_a / own_a, norm_b / own_b) <= 0.5:
        return -1.0
    if np.sqrt(_ratio(norm_a, norm_b)) > max_amplitude_ratio:
        return -1.0
    return float((ta * tb).sum() / np.sqrt(norm_a * norm_b))


def merge_shifted_units(
    labels: np.ndarray,
    templates,
    num_channels: int,
    min_similarity: float = 0.95,
    max_lag: int = 8,
    max_amplitude_ratio: float = 1.5,
    refractory: Refractory | None = None,
    max_trough_ratio: float = 1.15,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Labels with units merged whose peeling templates (sort/peel.Templates) agree once one is
    shifted by up to ``max_lag`` samples, and the merged pairs (unit kept, unit merged into it);
    labels are not renumbered.

    ``merge_similar_units`` compares templates at lag 0. One neuron whose spike reaches its
    channels at different times is detected on one channel for some spikes and on another a few
    samples later for others, and becomes two clusters whose mean waveforms are shifted copies:
    dissimilar at lag 0, nearly identical once aligned (docs/design-decisions.md, § Clustering).
    Templates are compared on the probe channels both cover (of ``num_channels``); pairs whose
    shared channels hold less than half of either template's energy, or whose sizes differ by
    more than ``max_amplitude_ratio``, are not compared; nor are pairs detected on one centre
    channel whose troughs there differ by more than ``max_trough_ratio``: one neuron seen on one
    channel has one size there, two neurons at one site (at different depths) do not. Pairs at
    ``min_similarity`` or above are merged transitively, unless ``refractory`` tells that the two
    groups are two neurons."""
    labels = np.asarray(labels).copy()
    waveforms = templates.waveforms
    num_units, num_samples, _ = waveforms.shape
    on_probe = np.zeros((num_units, num_samples, num_channels))  # (U, T, C) µV on every channel
    covered = np.zeros((num_units, num_channels), bool)
    for unit in np.flatnonzero(templates.defined):
        channels = templates.channels[unit]
        real = channels >= 0
        on_probe[unit][:, channels[real]] = waveforms[unit][:, real]
        covered[unit, channels[real]] = True
    energy = (on_probe**2).sum(axis=(1, 2))
    centre = templates.channels[:, 0]  # footprints list the centre first
    trough = np.abs(waveforms[:, :, 0]).max(axis=1)  # µV, the centre's largest deflection
    root = np.arange(num_units)  # union-find forest: a merged unit points to the unit it joined
    merged = []
    for a, b in zip(*np.nonzero(np.triu(covered.astype(int) @ covered.T.astype(int) > 0, 1))):
        shared = covered[a] & covered[b]
        ta, tb = on_probe[a][:, shared], on_probe[b][:, shared]
        if min((ta**2).sum() / energy[a], (tb**2).sum() / energy[b]) < 0.5:
            continue
        if np.sqrt(_ratio(energy[a], energy[b])) > max_amplitude_ratio:
            continue
        if centre[a] == centre[b] and _ratio(trough[a], trough[b]) > max_trough_ratio:
            continue
        if _shifted_cosine(ta, tb, max_lag) >= min_similarity:
            ra, rb = _root(root, a), _root(root, b)
            if ra == rb or (
                refractory is not None
                and refractory.two_neurons(labels, _group(root, ra), _group(root, rb))
            ):
                continue
            root[rb] = ra
            merged.append((int(ra), int(rb)))
    if merged:
        final = np.array([_root(root, u) for u in range(num_units)])
        labels = np.where(labels >= 0, final[np.maximum(labels, 0)], -1)
    return labels, merged


def _ratio(a: float, b: float) -> float:
    """The larger of two positive sizes over the smaller (inf when one is not positive)."""
    return max(a, b) / min(a, b) if min(a, b) > 0 else np.inf


def _shifted_cosine(ta: np.ndarray, tb: np.ndarray, max_lag: int) -> float:
    """Largest cosine similarity of two (T, C) templates over shifts of -max_lag..max_lag samples
    (compared where they overlap in time)."""
    num_samples = len(ta)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (
            ta[max(0, lag) : num_samples + min(0, lag)],
            tb[max(0, -lag) : num_samples - max(0, lag)],
        )
        norm = np.sqrt((x**2).sum() * (y**2).sum())
        if norm > 0:
            best = max(best, float((x * y).sum() / norm))
    return best


def _group(root: np.ndarray, unit: int) -> np.ndarray:
    """The units whose root is ``unit``."""
    return np.array([u for u in range(len(root)) if _root(root, u) == unit])


def _root(root: np.ndarray, unit: int) -> int:
    while root[unit] != unit:
        unit = root[unit]
    return int(unit)
