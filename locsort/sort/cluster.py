"""Units from spike locations and waveform features.

The first paper sorted with a GMM on (x, y) plus two whitened principal components of the
centre-channel waveform. Here the number of units comes from the data: HDBSCAN (density
based, no unit count to give) clusters a bounded random sample of spikes in the space
(x, y, log amplitude, whitened PCs), and every spike then takes the label of its nearest
sampled neighbours, so the cost stays bounded on long recordings.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import HDBSCAN
from sklearn.neighbors import KNeighborsClassifier

from ..params import Params


def clustering_features(x, y, amplitude, centre_pcs, params: Params) -> np.ndarray:
    """(n, 3 + cluster_pcs) feature matrix in which one unit of distance is comparable across
    dimensions: locations in units of ``cluster_location_scale_um``, log amplitude and PCs
    whitened to unit variance."""
    location = np.column_stack([x, y]) / params.constants.cluster_location_scale_um
    log_amp = np.log(np.clip(np.abs(amplitude), 1e-3, None))
    pcs = centre_pcs[:, : params.constants.cluster_pcs]
    extra = np.column_stack([log_amp, pcs]).astype(np.float64)
    if len(extra) > 1:
        extra = (extra - extra.mean(0)) / np.where(extra.std(0) > 0, extra.std(0), 1.0)
    return np.column_stack([location, extra]).astype(np.float32)


def cluster(features: np.ndarray, params: Params) -> np.ndarray:
    """Labels 0..U-1 per spike (-1 for noise), U chosen by the data."""
    n = len(features)
    labels = np.full(n, -1, dtype=np.int64)
    if n < params.constants.cluster_min_size:
        return labels
    valid = np.all(np.isfinite(features), axis=1)
    index = np.flatnonzero(valid)
    rng = np.random.default_rng(params.seed)
    sample = np.sort(
        rng.choice(index, size=min(len(index), params.constants.cluster_sample), replace=False)
    )
    min_size = max(
        5, int(round(params.constants.cluster_min_size * len(sample) / max(len(index), 1)))
    )
    sample_labels = HDBSCAN(min_cluster_size=min_size, min_samples=5, copy=True).fit_predict(
        features[sample]
    )
    labels[sample] = sample_labels
    rest = np.setdiff1d(index, sample)
    kept = sample_labels >= 0
    if len(rest) and kept.any():
        knn = KNeighborsClassifier(n_neighbors=min(5, int(kept.sum()))).fit(
            features[sample][kept], sample_labels[kept]
        )
        labels[rest] = knn.predict(features[rest])
    return renumber(labels)


def renumber(labels: np.ndarray) -> np.ndarray:
    """Units renumbered 0..U-1 in order (in place), -1 (noise) kept."""
    assigned = labels >= 0
    labels[assigned] = np.unique(labels[assigned], return_inverse=True)[1]
    return labels


def fit_waveform_basis(waveforms: np.ndarray, num_components: int) -> np.ndarray | None:
    """(T, P) temporal principal components of (n, T) centre-channel waveforms (None if too
    few)."""
    centre = waveforms.astype(np.float64)
    if len(centre) < max(num_components, 2):
        return None
    _, _, vt = np.linalg.svd(centre - centre.mean(0), full_matrices=False)
    return vt[:num_components].T.astype(np.float32)


def waveform_pcs(waveforms: np.ndarray, basis: np.ndarray | None, num_pcs: int) -> np.ndarray:
    """(n, P) projections of (n, T) centre-channel waveforms on ``basis`` (zeros without one)."""
    if basis is None:
        return np.zeros((len(waveforms), num_pcs), np.float32)
    return (waveforms @ basis).astype(np.float32)
