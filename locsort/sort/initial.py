"""Stage 4: the initial clustering of the training sample, which the neural sorter learns from
when no labels are given: HDBSCAN on locations and waveform features, then splits, merges, late
copies removed and left-out spikes adopted. Every step works on the bounded sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .cluster import cluster, clustering_features, renumber, waveform_pcs
from .merge import Refractory, merge_shifted_units, merge_similar_units
from .peel import Templates, adopt
from .postprocess import repeated_unit_spikes
from .split import split_units

if TYPE_CHECKING:
    from ..prepare import Prepared
    from ..sample import TrainingSample


def cluster_spikes(prep: Prepared, x, y, amplitude, pcs) -> np.ndarray:
    """(n,) units 0..U-1 (-1: noise) of spikes clustered on location, amplitude and PCs."""
    with prep.timer.stage("cluster"):
        return cluster(clustering_features(x, y, amplitude, pcs, prep.params), prep.params)


def initial_units(
    prep: Prepared, sample: TrainingSample, location: dict, basis: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(units, copies) of the sample's spikes: units 0..U-1 (-1: unknown, not a negative: HDBSCAN
    leaves many real spikes out of its dense cores) and, (n,) bool, the spikes of clusters that
    repeat a larger cluster's spikes (late copies on far channels: known negatives)."""
    constants = prep.params.constants
    pcs = waveform_pcs(sample.centre_waveforms, basis, constants.waveform_pcs)
    units = cluster_spikes(prep, location["x"], location["y"], sample.peaks["amplitude"], pcs)
    with prep.timer.stage("cluster"):
        if constants.split_max_rounds > 0:
            units, _ = split_units(
                units,
                sample.windows,
                constants.cluster_min_size,
                num_pcs=tuple(k for k in (constants.split_pcs, constants.split_more_pcs) if k),
                max_rounds=constants.split_max_rounds,
                seed=prep.params.seed,
            )
        if constants.merge_min_similarity < 1.0:
            refractory = _refractory(prep, sample)
            units, _ = merge_similar_units(
                units,
                sample.windows,
                constants.merge_min_similarity,
                constants.merge_max_amplitude_ratio,
                refractory=refractory,
            )
            if constants.merge_max_shift_ms > 0 and len(units) and units.max() >= 1:
                units = _merge_shifted(prep, sample, units, refractory)
    copies = _late_copies(prep, sample, units)
    units = renumber(np.where(copies, -1, units))
    num_units = int(units.max()) + 1 if len(units) and units.max() >= 0 else 0
    if num_units and constants.cluster_adopt_min_fit < 1.0:
        units = _adopted(prep, sample, units, num_units, np.flatnonzero((units < 0) & ~copies))
    return units, copies


def _refractory(prep: Prepared, sample: TrainingSample) -> Refractory | None:
    """The sample's spike times for the merges' refractory test (None: no test)."""
    period = prep.params.constants.merge_refractory_ms
    if period <= 0:
        return None
    return Refractory(
        sample.times(prep.recording),
        prep.recording.get_sampling_frequency(),
        sample.duration,
        period,
    )


def _merge_shifted(
    prep: Prepared, sample: TrainingSample, units: np.ndarray, refractory: Refractory | None
) -> np.ndarray:
    """Clusters merged that are one neuron detected on channels whose troughs come at different
    times (merge.merge_shifted_units), renumbered."""
    constants = prep.params.constants
    templates = Templates.fit(
        sample.snippets,
        sample.peaks["channel_index"],
        units,
        int(units.max()) + 1,
        sample.footprints,
    )
    max_lag = int(
        round(constants.merge_max_shift_ms * prep.recording.get_sampling_frequency() / 1000)
    )
    units, _ = merge_shifted_units(
        units,
        templates,
        len(sample.footprints),
        constants.merge_min_similarity,
        max_lag,
        constants.merge_max_amplitude_ratio,
        refractory,
        np.inf if prep.registered else constants.merge_max_trough_ratio,  # sizes move with drift
    )
    return renumber(units)


def _late_copies(prep: Prepared, sample: TrainingSample, units: np.ndarray) -> np.ndarray:
    """(n,) bool: spikes of clusters that repeat a larger cluster's spikes within
    ``duplicate_unit_max_lag_ms`` (postprocess.repeated_unit_spikes): one neuron's spikes
    detected again on far channels, which would become false-positive units."""
    constants = prep.params.constants
    if constants.duplicate_unit_min_shared >= 1.0:
        return np.zeros(len(units), bool)
    return repeated_unit_spikes(
        sample.times(prep.recording),
        units,
        prep.recording.get_sampling_frequency(),
        constants.duplicate_unit_min_shared,
        constants.duplicate_unit_max_lag_ms,
    )


def _adopted(
    prep: Prepared, sample: TrainingSample, units: np.ndarray, num_units: int, open_rows: np.ndarray
) -> np.ndarray:
    """``units`` with the unclustered spikes at ``open_rows`` given to the cluster whose template
    fits them (peel.adopt): a unit's spikes detected away from its usual channel."""
    constants = prep.params.constants
    with prep.timer.stage("cluster"):
        templates = Templates.fit(
            sample.snippets, sample.peaks["channel_index"], units, num_units, sample.footprints
        )
        return adopt(
            sample.snippets,
            sample.footprints[sample.peaks["channel_index"]],
            units,
            open_rows,
            templates,
            constants.cluster_adopt_min_fit,
            prep.noise,
            constants.cluster_adopt_max_residual,
        )
