"""Merging over-split clusters before they become training labels.

HDBSCAN on (location, amplitude, PCs) cuts one neuron in two when its spikes' locations or
amplitudes spread (drift, bursts, noisy posteriors). Such pieces have the same waveform on the
same channels; two different neurons almost never do. So each cluster gets a template — its
mean waveform (noise units) on every probe contact its spikes' neighbourhoods cover — and the
most similar pair of clusters is merged while their templates agree (cosine similarity over the
contacts both cover) and their sizes do not differ by more than ``max_amplitude_ratio``.
"""

from __future__ import annotations

import numpy as np


def unit_templates(labels: np.ndarray, windows, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, P, T) mean waveforms on the P contact positions the windows cover, and (U, P) the
    number of spikes that contributed to each (0: the unit never reaches that contact)."""
    keep = labels >= 0
    wave = windows.waveforms[keep].astype(np.float32)  # (n, T, K)
    absolute = windows.centre_xy[keep][:, None, :] + windows.slot_xy[keep]  # (n, K, 2) µm on the probe
    real = windows.real[keep]
    positions, contact = np.unique(np.round(absolute[real], 1), axis=0, return_inverse=True)
    unit = np.repeat(labels[keep][:, None], real.shape[1], axis=1)[real]
    num_contacts = len(positions)
    flat = unit * num_contacts + contact.ravel()
    samples = wave.transpose(0, 2, 1)[real]  # (pairs, T)
    sums = np.zeros((num_units * num_contacts, samples.shape[1]), np.float64)
    np.add.at(sums, flat, samples)
    counts = np.bincount(flat, minlength=num_units * num_contacts).astype(np.float64)
    templates = sums / np.maximum(counts, 1)[:, None]
    return templates.reshape(num_units, num_contacts, -1), counts.reshape(num_units, num_contacts)


def merge_similar_units(labels: np.ndarray, windows, min_similarity: float = 0.9, max_amplitude_ratio: float = 1.5,
                        min_coverage: int = 5) -> tuple[np.ndarray, int]:
    """Labels with over-split units merged (renumbered 0..U'-1, -1 kept) and the number of
    merges. ``min_coverage``: spikes a contact needs in both units to be compared there."""
    labels = np.asarray(labels).copy()
    num_units = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    if num_units < 2:
        return labels, 0
    templates, counts = unit_templates(labels, windows, num_units)
    sizes = np.bincount(labels[labels >= 0], minlength=num_units).astype(np.float64)
    alive = np.ones(num_units, bool)
    merges = 0
    while True:
        similarity = _pairwise(templates, counts, min_coverage, max_amplitude_ratio)
        similarity[~alive] = -1
        similarity[:, ~alive] = -1
        a, b = np.unravel_index(np.argmax(similarity), similarity.shape)
        if similarity[a, b] < min_similarity:
            break
        # b joins a: spike-weighted templates, per contact
        total = counts[a] + counts[b]
        templates[a] = (templates[a] * counts[a][:, None] + templates[b] * counts[b][:, None]) / np.maximum(total, 1)[:, None]
        counts[a] = total
        sizes[a] += sizes[b]
        alive[b] = False
        labels[labels == b] = a
        merges += 1
    found = np.unique(labels[labels >= 0])
    remap = np.full(num_units, -1)
    remap[found] = np.arange(len(found))
    labels[labels >= 0] = remap[labels[labels >= 0]]
    return labels, merges


def _pairwise(templates: np.ndarray, counts: np.ndarray, min_coverage: int, max_amplitude_ratio: float) -> np.ndarray:
    """(U, U) cosine similarity of templates over the contacts both units cover (upper
    triangle; -1 where not comparable or the sizes differ too much)."""
    covered = (counts >= min_coverage).astype(np.float64)  # (U, P)
    both = covered[:, None, :] * covered[None, :, :]  # (U, U, P)
    # dot products and norms restricted to shared contacts
    dot = np.einsum("upt,vpt,uvp->uv", templates, templates, both)
    energy = (templates**2).sum(axis=2)  # (U, P)
    norm_u = np.einsum("up,uvp->uv", energy, both)
    norm_v = np.einsum("vp,uvp->uv", energy, both)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot / np.sqrt(norm_u * norm_v)
        ratio = np.sqrt(np.maximum(norm_u, norm_v) / np.maximum(np.minimum(norm_u, norm_v), 1e-12))
    # the shared contacts must hold most of each unit's energy: units far apart share little
    own = (energy * covered).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shared = np.minimum(norm_u / own[:, None], norm_v / own[None, :])
    result = np.where((shared > 0.5) & (ratio <= max_amplitude_ratio) & np.isfinite(cosine), cosine, -1.0)
    result[np.tril_indices(len(templates))] = -1.0
    return result
