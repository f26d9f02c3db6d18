"""Stage 8: what a user curates with.

- ``analyzer/``: a SpikeInterface SortingAnalyzer (binary folder) of the sorting on the
  preprocessed (and, when motion was corrected, registered) recording, with the extensions
  ``ANALYZER_EXTENSIONS``, ``LOCSORT_EXTENSIONS`` and ``quality_metrics``. Its
  ``spike_locations`` are locsort's own posterior means and SDs (not a recomputation), with
  ``y`` the registered depth.
- ``units.tsv``: one row per unit (``UNIT_COLUMNS``) with its quality label, ``good``, ``mua``
  or ``noise`` (``quality_labels``; thresholds in ``locsort.constants`` § Curation).

Waveforms are kept for a bounded number of spikes per unit and every pass over the traces
runs in chunks, so memory does not grow with the recording's duration.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

WAVEFORM_MS = (1.0, 2.0)  # ms before and after the spike (SpikeInterface's default window)
READ_S = 0.25  # waveforms are read in stretches this long, each holding many units' spikes ...
READ_GAP_S = 0.02  # ... and a rare unit's spikes closer than this share a read ...
MAX_READS = 400  # ... in at most this many reads (each filters all channels: ~15 ms at 384)
MIN_STRETCH_SPIKES = 2  # a stretch giving fewer needed spikes costs more than reading them alone
# computed by SpikeInterface, in this order (each needs the ones before it) ...
ANALYZER_EXTENSIONS = {
    "waveforms": {"ms_before": WAVEFORM_MS[0], "ms_after": WAVEFORM_MS[1]},
    "templates": {},
    "correlograms": {"method": "numpy"},  # numba's compile costs more than the counting
    # the template's centre of mass: fast (the posterior positions are in units.tsv)
    "unit_locations": {"method": "center_of_mass"},
}
# ... and set by locsort: which spikes' waveforms are kept (bounded reads), the noise levels it
# measured, the amplitudes and posteriors of its main pass (no second pass over the traces),
# the similarity without numba
LOCSORT_EXTENSIONS = (
    "random_spikes",
    "noise_levels",
    "spike_amplitudes",
    "spike_locations",
    "template_similarity",
)
QUALITY_METRICS = (
    "num_spikes",
    "firing_rate",
    "snr",
    "isi_violation",
    "presence_ratio",
    "amplitude_cutoff",
)
QUALITY_LABELS = ("good", "mua", "noise")
# units.tsv, one row per unit: name -> meaning (docs/output-format.md repeats it)
UNIT_COLUMNS = {
    "unit_id": "the unit's id in sorting/ and spikes.npy (unit_index)",
    "num_spikes": "spikes assigned to the unit",
    "firing_rate_hz": "spikes per second over the whole recording",
    "x_um": "median x of the unit's spikes (posterior means), µm",
    "y_um": "median registered depth (y_registered), µm",
    "z_um": "median distance from the probe plane, µm",
    "x_std_um": "median posterior SD of x of its spikes, µm",
    "y_std_um": "median posterior SD of y, µm",
    "z_std_um": "median posterior SD of z, µm",
    "amplitude_uv": "median of its spikes' peaks, each on its detection channel, µV (< 0)",
    "snr": "template peak over the noise SD on the main channel",
    "isi_violations_ratio": "refractory-period violations against a Poisson unit's (Hill 2011)",
    "presence_ratio": "share of 60 s bins (a tenth of a shorter recording) with its spikes",
    "amplitude_cutoff": "estimated share of its spikes lost below the detection threshold",
    "quality": "good, mua (multi-unit or incomplete) or noise",
}
REFRACTORY_MS = 1.5  # Kilosort's and SpikeInterface's default refractory period
CENSORED_MS = 0.0  # no censored period: every interval counts (SpikeInterface's default)
PRESENCE_BIN_S = 60.0  # presence in 60 s bins (SpikeInterface, bombcell) ...
PRESENCE_BINS = 10  # ... or shorter ones on a short recording, so that there are 10
AMPLITUDE_BINS = 100  # amplitude histogram bins: defined from 500 spikes (5 per bin)


def build_analyzer(
    recording,
    sorting,
    spikes: np.ndarray,
    noise: np.ndarray,
    folder: Path,
    constants,
    *,
    seed: int,
    n_jobs: int,
):
    """The SortingAnalyzer of ``sorting`` on ``recording`` saved in ``folder``, with the
    ``ANALYZER_EXTENSIONS``, the ``LOCSORT_EXTENSIONS`` and the ``QUALITY_METRICS`` (none
    without units). ``noise``: (C,) noise SD of ``recording``'s channels, µV, measured as
    SpikeInterface's ``get_noise_levels`` does (``Prepared.noise``)."""
    from spikeinterface.core import create_sorting_analyzer

    job_kwargs = {
        "n_jobs": n_jobs,
        "pool_engine": "thread",  # the recording may live in memory: no process to ship it to
        "chunk_duration": "1s",
        "progress_bar": False,
    }
    with warnings.catch_warnings():  # an in-memory recording cannot be saved as provenance
        warnings.filterwarnings("ignore", message=".*not serializable.*")
        warnings.filterwarnings("ignore", message=".*[Pp]rovenance.*")
        analyzer = create_sorting_analyzer(
            sorting,
            recording,
            format="binary_folder",
            folder=folder,
            sparse=True,  # SpikeInterface's default: channels within 100 µm of the main one
            main_channel_indices=main_channels(spikes, sorting.unit_ids),
            seed=seed,
            job_kwargs=job_kwargs,
        )
    if len(sorting.unit_ids) == 0:  # SpikeInterface's extensions need a unit: none to show
        return analyzer
    set_waveform_spikes(analyzer, constants.analyzer_max_waveforms, seed)
    _set_extension(analyzer, "noise_levels", {"method": "mad"}, {"noise_levels": noise})
    analyzer.compute(ANALYZER_EXTENSIONS, verbose=False, **job_kwargs)
    rows = spike_rows(analyzer, spikes)
    set_spike_amplitudes(analyzer, spikes, rows)
    set_spike_locations(analyzer, spikes, rows)
    set_template_similarity(analyzer)
    duration = sum(recording.get_duration(s) for s in range(recording.get_num_segments()))
    with warnings.catch_warnings():  # undefined metrics are NaN, as units.tsv documents
        warnings.filterwarnings("ignore", message=".*set to NaN.*")
        warnings.filterwarnings("ignore", message=".*[Pp]resence ratio.*")
        analyzer.compute(
            "quality_metrics",
            metric_names=list(QUALITY_METRICS),
            metric_params={
                "isi_violation": {"isi_threshold_ms": REFRACTORY_MS, "min_isi_ms": CENSORED_MS},
                "presence_ratio": {"bin_duration_s": min(PRESENCE_BIN_S, duration / PRESENCE_BINS)},
                "amplitude_cutoff": {"num_histogram_bins": AMPLITUDE_BINS},
            },
            verbose=False,
            **job_kwargs,
        )
    return analyzer


def set_waveform_spikes(analyzer, per_unit: int, seed: int) -> None:
    """The analyzer's ``random_spikes``: at most ``per_unit`` random spikes of each unit whose
    waveforms are kept, chosen so that reading them takes at most ``MAX_READS`` reads of the
    traces (``spike_reads``), whatever the duration."""
    recording, vector = analyzer.recording, analyzer.sorting.to_spike_vector()
    fs = analyzer.sampling_frequency
    nbefore = int(WAVEFORM_MS[0] * fs / 1000)
    width = nbefore + int(WAVEFORM_MS[1] * fs / 1000)
    lengths = np.array([recording.get_num_samples(s) for s in range(recording.get_num_segments())])
    start = vector["sample_index"].astype(np.int64) - nbefore
    rows = np.flatnonzero((start >= 0) & (start + width <= lengths[vector["segment_index"]]))
    reads = spike_reads(  # stretches counted from the spike times: SpikeInterface's chunks
        vector["segment_index"][rows],
        vector["sample_index"][rows].astype(np.int64),
        vector["unit_index"][rows],
        np.full(len(analyzer.unit_ids), per_unit),
        width,
        max(int(READ_S * fs), width),
        int(READ_GAP_S * fs),
        MAX_READS,
        np.random.default_rng(seed),
    )
    chosen = np.sort(np.concatenate([rows[read[3]] for read in reads] or [np.zeros(0, int)]))
    _set_extension(
        analyzer,
        "random_spikes",
        {"method": "locsort", "max_spikes_per_unit": per_unit, "margin_size": None, "seed": seed},
        {"random_spikes_indices": chosen.astype(np.int64)},
    )


def set_spike_locations(analyzer, spikes: np.ndarray, rows: np.ndarray) -> None:
    """The analyzer's ``spike_locations``: locsort's posterior of each spike of the sorting
    (``rows``: their rows in ``spikes``, ``spike_rows``; ``y``: registered depth)."""
    from .plugins import LOCATION_DTYPE

    locations = np.zeros(len(rows), dtype=LOCATION_DTYPE)
    for name, _ in LOCATION_DTYPE:
        locations[name] = spikes["y_registered" if name == "y" else name][rows]
    _set_extension(
        analyzer,
        "spike_locations",
        {"method": "locsort", "method_kwargs": {}},
        {"spike_locations": locations},
    )


def set_spike_amplitudes(analyzer, spikes: np.ndarray, rows: np.ndarray) -> None:
    """The analyzer's ``spike_amplitudes``: each spike's own peak (``amplitude``, µV, on the
    channel it was detected on), read in the main pass, where SpikeInterface would read the
    whole recording once more for the value on the unit's main channel (``rows``: as for
    ``set_spike_locations``)."""
    _set_extension(
        analyzer, "spike_amplitudes", {}, {"amplitudes": spikes["amplitude"][rows].astype(float)}
    )


def spike_rows(analyzer, spikes: np.ndarray) -> np.ndarray:
    """For each spike of the analyzer's spike vector, its row in ``spikes``."""
    vector = analyzer.sorting.to_spike_vector()
    vector_units = np.asarray(analyzer.sorting.unit_ids)[vector["unit_index"]]
    assigned = np.flatnonzero(spikes["unit_index"] >= 0)
    a = spikes[assigned]
    mine = assigned[np.lexsort((a["unit_index"], a["sample_index"], a["segment_index"]))]
    theirs = np.lexsort((vector_units, vector["sample_index"], vector["segment_index"]))
    if not (
        len(mine) == len(theirs)
        and np.array_equal(spikes["sample_index"][mine], vector["sample_index"][theirs])
        and np.array_equal(spikes["unit_index"][mine], vector_units[theirs])
    ):
        raise RuntimeError("the sorting's spikes are not the assigned spikes of spikes.npy")
    rows = np.empty(len(vector), np.int64)
    rows[theirs] = mine
    return rows


def set_template_similarity(analyzer) -> None:
    """The analyzer's ``template_similarity`` as SpikeInterface defines it by default (cosine
    over the union of the two units' channels, no lag), computed here because SpikeInterface's
    compiles a numba kernel on every run, which costs more than the whole analyzer."""
    from spikeinterface.core.template_tools import get_dense_templates_array

    templates = get_dense_templates_array(analyzer, return_in_uV=analyzer.return_in_uV)
    # dense templates are zero off their channels: the union's dot products are the full ones
    flat = templates.reshape(len(templates), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    flat /= np.where(norms > 0, norms, 1.0)[:, None]
    similarity = (flat @ flat.T).astype(np.float32)
    _set_extension(
        analyzer,
        "template_similarity",
        {"method": "cosine", "max_lag_ms": 0, "support": "union"},
        {"similarity": similarity},
    )


def _set_extension(analyzer, name: str, params: dict, data: dict) -> None:
    """Extension ``name`` of the analyzer with ``params`` and ``data`` (its arrays), saved."""
    from spikeinterface.core.sortinganalyzer import get_extension_class

    extension = get_extension_class(name)(analyzer)
    extension.set_params(**params)
    extension.data.update(data)
    extension.run_info["run_completed"] = True
    extension.save()
    analyzer.extensions[name] = extension


def units_table(analyzer, spikes: np.ndarray, constants):
    """``UNIT_COLUMNS`` for every unit of the analyzer's sorting, as a pandas DataFrame."""
    import pandas as pd

    unit_ids = np.asarray(analyzer.sorting.unit_ids)
    table = pd.DataFrame({"unit_id": unit_ids.astype(int)})
    if len(unit_ids):
        metrics = analyzer.get_extension("quality_metrics").get_data()
        table["num_spikes"] = metrics["num_spikes"].to_numpy(int)
        table["firing_rate_hz"] = metrics["firing_rate"].to_numpy(float)
    else:
        metrics = pd.DataFrame(columns=list(UNIT_COLUMNS))
        table["num_spikes"] = np.zeros(0, int)
        table["firing_rate_hz"] = np.zeros(0)
    fields = ("x", "y_registered", "z", "x_std", "y_std", "z_std")
    medians = unit_positions(spikes, unit_ids, fields=fields)
    for i, name in enumerate(("x_um", "y_um", "z_um", "x_std_um", "y_std_um", "z_std_um")):
        table[name] = medians[:, i]
    by_unit = (
        analyzer.get_extension("spike_amplitudes").get_data(outputs="by_unit", concatenated=True)
        if len(unit_ids)
        else {}
    )
    table["amplitude_uv"] = [_median(np.asarray(by_unit[unit], float)) for unit in unit_ids]
    table["snr"] = metrics["snr"].to_numpy(float)
    table["isi_violations_ratio"] = metrics["isi_violations_ratio"].to_numpy(float)
    table["presence_ratio"] = metrics["presence_ratio"].to_numpy(float)
    table["amplitude_cutoff"] = metrics["amplitude_cutoff"].to_numpy(float)
    table["quality"] = quality_labels(table, constants)
    return table[list(UNIT_COLUMNS)]


def main_channels(spikes: np.ndarray, unit_ids) -> np.ndarray:
    """Each unit's main channel: the one most of its spikes were detected on (no trace read,
    where SpikeInterface would read 100 spikes' waveforms per unit to find it)."""
    assigned = spikes[spikes["unit_index"] >= 0]
    pairs, counts = np.unique(
        np.stack([assigned["unit_index"], assigned["channel_index"]], axis=1).astype(np.int64),
        axis=0,
        return_counts=True,
    )
    pairs = pairs[np.lexsort((-counts, pairs[:, 0]))]  # per unit, the most frequent first
    units, first = np.unique(pairs[:, 0], return_index=True)
    most = dict(zip(units.tolist(), pairs[first, 1].tolist()))
    return np.array([most.get(int(unit), 0) for unit in unit_ids], dtype=np.int64)


def unit_positions(
    spikes: np.ndarray, unit_ids, fields: tuple = ("x", "y_registered", "z")
) -> np.ndarray:
    """(U, len(fields)) median of each field over each unit's spikes (NaN: none finite);
    by default the unit's position: x, registered depth and z, µm."""
    unit_ids = np.asarray(unit_ids)
    assigned = spikes[spikes["unit_index"] >= 0]
    assigned = assigned[np.argsort(assigned["unit_index"], kind="stable")]
    starts = np.searchsorted(assigned["unit_index"], unit_ids)
    ends = np.searchsorted(assigned["unit_index"], unit_ids, side="right")
    out = np.full((len(unit_ids), len(fields)), np.nan)
    for j, name in enumerate(fields):
        values = assigned[name]
        out[:, j] = [_median(values[a:b]) for a, b in zip(starts, ends)]
    return out


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def quality_labels(table, constants) -> np.ndarray:
    """``noise`` where the unit does not stand out of the noise (SNR), ``mua`` where it breaks
    the refractory period, is absent for much of the recording, loses many spikes below the
    threshold or has too few spikes to judge, ``good`` otherwise (in the manner of Kilosort's
    ``good`` and bombcell). A metric the recording cannot define (NaN: a recording too short
    for presence bins, too few spikes for the amplitude histogram) does not count against a
    unit."""

    def within(name, low=-np.inf, high=np.inf):
        values = table[name].to_numpy(float)
        return np.isnan(values) | ((values >= low) & (values <= high))

    noise = ~(table["snr"].to_numpy(float) >= constants.noise_max_snr)
    good = (
        within("isi_violations_ratio", high=constants.good_max_isi_violations)
        & within("presence_ratio", low=constants.good_min_presence_ratio)
        & within("amplitude_cutoff", high=constants.good_max_amplitude_cutoff)
        & (table["num_spikes"].to_numpy(float) >= constants.good_min_spikes)
    )
    return np.where(noise, "noise", np.where(good, "good", "mua"))


def write_units(table, path: Path) -> None:
    """``units.tsv`` (and Phy's tables): tab-separated, one header line, NaN written as
    ``nan``."""
    from .io import write_atomic

    text = table.to_csv(sep="\t", index=False, na_rep="nan", float_format="%.6g")
    write_atomic(path, lambda f: f.write(text.encode()))


def label_phy(folder: Path, table) -> None:
    """The Phy folder's ``cluster_group.tsv`` (Phy's own label column) set to the quality
    labels, and ``cluster_info.tsv`` with the whole units table (Phy's cluster ids are the
    unit indices in the sorting's order)."""
    group = table[["unit_id"]].rename(columns={"unit_id": "cluster_id"})
    group["cluster_id"] = np.arange(len(table))
    group["group"] = table["quality"].to_numpy()
    info = table.rename(columns={"quality": "group"})
    info.insert(0, "cluster_id", np.arange(len(table)))
    for name, frame in (("cluster_group.tsv", group), ("cluster_info.tsv", info)):
        write_units(frame, folder / name)


def spike_reads(
    segment: np.ndarray,
    start: np.ndarray,
    slot: np.ndarray,
    need: np.ndarray,
    width: int,
    span: int,
    gap: int,
    max_reads: int,
    rng: np.random.Generator,
) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """Which traces to read to get ``need[k]`` spikes of each slot k (a unit): (segment, first
    frame, end frame, positions in the given arrays, their slots) per read, at most
    ``max_reads`` reads. Spike i's window is ``start[i]`` to ``start[i] + width``.

    A read costs about as much as ``span`` samples of traces (filtering margins), so reads
    first go to random ``span``-long stretches, each giving every slot still short of spikes
    all it has there (when that is at least ``MIN_STRETCH_SPIKES``); slots still short after
    half the reads (rare units) get reads around their own spikes (one read for those less
    than ``gap`` samples apart). Against one short read per spike, this gives every unit many
    more spikes from far fewer reads, and the reads do not grow with the recording's
    duration."""
    need = np.array(need, np.int64)
    rows = np.lexsort((start, segment))
    slots = slot[rows]
    taken = np.zeros(len(rows), bool)
    reads = []

    def take(candidates: np.ndarray) -> np.ndarray:
        """The candidates (positions in ``rows``, time order) that slots short of spikes still
        need."""
        order = np.argsort(slots[candidates], kind="stable")
        by_slot = candidates[order]
        first = np.r_[0, np.flatnonzero(np.diff(slots[by_slot])) + 1]
        rank = np.arange(len(by_slot)) - np.repeat(first, np.diff(np.r_[first, len(by_slot)]))
        chosen = np.sort(by_slot[rank < need[slots[by_slot]]])
        np.subtract.at(need, slots[chosen], 1)
        taken[chosen] = True
        return chosen

    def add_read(chosen: np.ndarray) -> None:
        first, end = int(start[rows[chosen[0]]]), int(start[rows[chosen[-1]]]) + width
        reads.append((int(segment[rows[chosen[0]]]), first, end, rows[chosen], slots[chosen]))

    if len(rows) == 0:
        return reads
    # dense stretches: (segment, stretch) keys of every spike, visited in random order
    keys, key_of = np.unique(
        np.column_stack([segment[rows], start[rows] // span]), axis=0, return_inverse=True
    )
    key_of = key_of.ravel()
    members = np.split(
        np.argsort(key_of, kind="stable"), np.cumsum(np.bincount(key_of, minlength=len(keys)))[:-1]
    )
    for k in rng.permutation(len(keys)):
        if len(reads) >= max_reads // 2 or not (need > 0).any():
            break
        candidates = members[k][need[slots[members[k]]] > 0]
        if len(candidates) >= MIN_STRETCH_SPIKES:
            add_read(take(candidates))
    # rare units: random spikes of their own, grouped into reads when close in time
    left = np.flatnonzero(~taken & (need[slots] > 0))
    if len(left) and len(reads) < max_reads:
        chosen = take(rng.permutation(left))  # random spikes of each unit, in time order
        groups = np.split(
            chosen,
            np.flatnonzero(
                (np.diff(start[rows[chosen]]) > width + gap) | (np.diff(segment[rows[chosen]]) != 0)
            )
            + 1,
        )
        budget = max_reads - len(reads)
        if len(groups) > budget:
            keep = np.sort(rng.choice(len(groups), size=budget, replace=False))
            groups = [groups[i] for i in keep]
        for group in groups:
            add_read(group)
    return reads
