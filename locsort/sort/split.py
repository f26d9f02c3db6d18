"""Splitting under-split clusters before they become training labels.

Clustering on (location, amplitude, centre-channel PCs) cannot tell apart two neurons that sit
close together with similar spike sizes: their locations overlap, and one channel's waveform
says little. Their multi-channel waveforms still differ. So every cluster is looked at again
on its own: its spikes' waveforms on the contacts where its template is largest, reduced by PCA
(local to the cluster, so the components describe how *its* spikes differ), are clustered by
HDBSCAN; two or more dense groups make two or more units, and each piece is examined again.
Where the leading components show one group, more components are looked at: a few keep the
density estimate sound on a few hundred spikes, and a difference only later components carry
(two neurons at one depth on either side of a single column) needs more. A false split (one
neuron whose spikes vary in size) has the same waveform shape in both pieces, and the merge step
(merge.py), which runs after this one, joins it back.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA

from .cluster import renumber
from .merge import unit_templates

_SAME_CONTACT_UM = 1.0


def split_units(
    labels: np.ndarray,
    windows,
    min_size: int,
    num_contacts: int = 8,
    num_pcs: tuple[int, ...] = (6,),
    max_rounds: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Labels with under-split units divided (renumbered 0..U'-1, -1 kept) and the number of
    splits. ``min_size``: spikes a piece needs to be a unit; ``num_contacts``: contacts (largest
    template energy first) whose waveforms describe a unit's spikes; ``num_pcs``: how many PCA
    components of those waveforms are looked at, each count in turn until one splits the unit;
    ``max_rounds``: how many times a piece may be split again."""
    labels = np.asarray(labels).copy()
    if not len(labels) or labels.max() < 0:
        return labels, 0
    rng = np.random.default_rng(seed)
    queue = [(int(u), 0) for u in np.unique(labels[labels >= 0])]
    next_label = int(labels.max()) + 1
    splits = 0
    while queue:
        unit, depth = queue.pop()
        members = np.flatnonzero(labels == unit)
        if len(members) < 2 * min_size or depth >= max_rounds:
            continue
        pieces = _split_one(windows.subset(members), min_size, num_contacts, num_pcs, rng)
        if pieces is None:
            continue
        splits += 1
        for piece in range(1, pieces.max() + 1):
            labels[members[pieces == piece]] = next_label
            queue.append((next_label, depth + 1))
            next_label += 1
        queue.append((unit, depth + 1))
    return renumber(labels), splits


def _split_one(
    windows, min_size: int, num_contacts: int, num_pcs: tuple[int, ...], rng
) -> np.ndarray | None:
    """Piece index 0..P-1 per spike of one unit (P >= 2), or None when it is one dense group in
    the leading components, for each count of ``num_pcs`` in turn."""
    n = len(windows)
    templates, counts, positions = unit_templates(np.zeros(n, np.int64), windows, 1)
    covered = counts[0] >= max(5, n // 2)  # contacts most of the unit's spikes see
    if not covered.any():
        return None
    energy = np.where(covered, (templates[0] ** 2).sum(axis=1), -1.0)
    contacts = np.argsort(-energy)[: min(num_contacts, int(covered.sum()))]
    features = _waveforms_on(windows, positions[contacts], templates[0][contacts])
    features = PCA(
        n_components=min(max(num_pcs), features.shape[1], n - 1),
        svd_solver="covariance_eigh",
        random_state=0,
    ).fit_transform(features)  # n >> features: eigh of the covariance, not a full SVD
    # HDBSCAN's cost grows fast with n: find the groups on a bounded subset, then assign the rest
    subset = np.sort(rng.choice(n, size=min(n, 4000), replace=False))
    for k in num_pcs:
        pieces = _groups(features[:, :k], subset, n, min_size)
        if pieces is not None:
            return pieces
    return None


def _groups(features, subset, n: int, min_size: int) -> np.ndarray | None:
    """Piece index per spike from HDBSCAN's dense groups among the ``subset`` rows, or None."""
    fitted = features[subset]
    scale = len(fitted) / n
    groups = HDBSCAN(
        min_cluster_size=max(5, int(round(max(min_size, n // 20) * scale))),
        min_samples=5,
        copy=True,
    ).fit_predict(fitted)
    found = np.unique(groups[groups >= 0])
    if len(found) < 2:
        return None
    centroids = np.stack([fitted[groups == g].mean(axis=0) for g in found])
    nearest = np.argmin(((features[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    sizes = np.bincount(nearest, minlength=len(found))
    if np.sum(sizes >= min_size) < 2:
        return None
    # pieces too small to be units join their nearest large piece
    large = np.flatnonzero(sizes >= min_size)
    distance = ((centroids[:, None, :] - centroids[None, large]) ** 2).sum(axis=2)
    to_large = large[np.argmin(distance, axis=1)]
    return np.searchsorted(large, to_large[nearest])


def _waveforms_on(windows, contact_xy: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(n, M * T) waveforms of every spike on M probe contacts (µm positions); a contact a spike's
    neighbourhood does not cover reads the unit's template there."""
    absolute = windows.centre_xy[:, None, :] + windows.slot_xy  # (n, K, 2)
    gap = np.linalg.norm(absolute[:, :, None, :] - contact_xy[None, None], axis=-1)  # (n, K, M)
    gap = np.where(windows.real[:, :, None], gap, np.inf)
    slot = np.argmin(gap, axis=1)  # (n, M)
    hit = np.take_along_axis(gap, slot[:, None, :], axis=1)[:, 0] <= _SAME_CONTACT_UM
    waves = np.take_along_axis(windows.waveforms, slot[:, None, :], axis=2).astype(
        np.float32
    )  # (n, T, M)
    waves = np.where(hit[:, None, :], waves, template.T[None].astype(np.float32))
    return waves.transpose(0, 2, 1).reshape(len(waves), -1)
