"""Peeling: a second look under the spikes the neural sorter assigned.

Candidates come from a locally exclusive detection: of two spikes that overlap within the
detection sweep and radius, only the larger is a candidate, so the smaller one is lost (most
of the spikes the sorter misses on well-sorted units share their only candidate with another
unit's spike; docs/design-decisions.md, § Peeling). Template-matching sorters
(SpyKING CIRCUS 2, Kilosort) find them by subtracting what they explained. locsort does the
same once per chunk: every assigned spike's unit template, scaled to the spike, is subtracted
from the chunk's traces, detection runs again on the residual, and the new candidates found
where something was subtracted go to the network like any other; one it assigns must also be
fitted by its unit's template (``unfitted``).

The residual is searched at a lower threshold (``peel_detect_threshold``) than the first pass,
and also where the first pass found nothing (``unclaimed``): a faint unit's spikes often stay
below the detection threshold, and the network and the template fit, not the threshold, decide
whether they are spikes. Spikes of larger units detected again on far channels at that
threshold are removed afterwards (postprocess.lagged_copy_spikes).

Templates are each unit's mean snippet (µV, the snippet span of Params) on the channels within
``peel_radius_um`` of its most common centre channel, from the labelled training sample. That
footprint is wider than the detection radius: a large spike still crosses the detection
threshold beyond its 25-channel neighbourhood, and what a narrower template left there was
detected again on the residual as a spike of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SPIKES = 5  # fewer labelled spikes on the unit's usual centre: no template, nothing subtracted
SHIFTS = (-1, 0, 1)  # samples the template may move from the candidate's time
SCALE_RANGE = (
    0.5,
    2.0,
)  # per-spike template scale: least squares, clipped (a collision must not inflate it)


@dataclass
class Templates:
    """waveforms : (U, T, M) µV snippet per unit on its footprint (before + after samples)
    channels : (U, M) the footprint's probe channels, -1 where padded; all -1 for a unit without
    a template"""

    waveforms: np.ndarray
    channels: np.ndarray

    @property
    def defined(self) -> np.ndarray:
        """(U,) bool: the unit has a template."""
        return (self.channels >= 0).any(axis=1)

    @classmethod
    def fit(
        cls,
        waveforms: np.ndarray,
        centres: np.ndarray,
        units: np.ndarray,
        num_units: int,
        footprints: np.ndarray,
    ) -> "Templates":
        """From (n, T, M) µV snippets of labelled spikes on their centre's footprint, their centre
        channels and units (-1: none); ``footprints``: (C, M) each centre's channels, -1 padded."""
        out = np.zeros((num_units,) + waveforms.shape[1:], np.float32)
        channels = np.full((num_units, footprints.shape[1]), -1, np.int64)
        for unit in range(num_units):
            rows = np.flatnonzero(units == unit)
            if len(rows) < MIN_SPIKES:
                continue
            values, counts = np.unique(centres[rows], return_counts=True)
            usual_centre = values[np.argmax(counts)]
            usual = rows[centres[rows] == usual_centre]
            if len(usual) >= MIN_SPIKES:
                out[unit] = waveforms[usual].astype(np.float32).mean(axis=0)
                channels[unit] = footprints[usual_centre]
        return cls(out, channels)


@dataclass
class Placed:
    """Spikes' unit templates where they explain most of each spike (see ``place``).
    shape : (n, T, M) template µV, zero on padding; channels : (n, M) channel per slot (0 where
    padded); real : (n, M) slot on the probe; times : (n, T) samples; scale : (n,) least-
    squares scale; gain : (n,) energy the scaled template removes; energy : (n,) the template's."""

    shape: np.ndarray
    channels: np.ndarray
    real: np.ndarray
    times: np.ndarray
    scale: np.ndarray
    gain: np.ndarray
    energy: np.ndarray


def place(
    traces: np.ndarray, rows: np.ndarray, units: np.ndarray, templates: Templates, before: int
) -> Placed:
    """The templates of ``units`` (all with a template) fitted to the spikes at ``rows``."""
    channels = templates.channels[units]  # (n, M)
    real = channels >= 0
    shape = templates.waveforms[units] * real[:, None, :]  # (n, T, M)
    energy = np.maximum(np.einsum("ntk,ntk->n", shape, shape), 1e-9)
    channels = np.where(real, channels, 0)
    c_idx = np.broadcast_to(channels[:, None, :], shape.shape)
    # the template goes where it explains most of the spike: best of SHIFTS samples around the
    # candidate (detection times are on one channel's trough, templates are averages)
    best_gain, best_scale, best_times = np.full(len(rows), -np.inf), np.ones(len(rows)), None
    for shift in SHIFTS:
        times = (
            rows[:, None] + shift + np.arange(-before, shape.shape[1] - before)[None, :]
        )  # (n, T)
        times = np.clip(times, 0, len(traces) - 1)
        snippet = traces[np.broadcast_to(times[:, :, None], shape.shape), c_idx]
        projection = np.einsum("ntk,ntk->n", snippet, shape)
        scale = np.clip(projection / energy, *SCALE_RANGE)
        gain = 2 * scale * projection - scale**2 * energy  # energy removed
        better = gain > best_gain
        best_gain[better], best_scale[better] = gain[better], scale[better]
        best_times = times if best_times is None else np.where(better[:, None], times, best_times)
    return Placed(shape, channels, real, best_times, best_scale, best_gain, energy)


@dataclass
class Significance:
    """How far above noise each unit's template match stands. The noise is modelled as Gaussian,
    correlated across channels (``covariance``) and in time (``autocorrelation``), the two
    separable; each template is prewhitened by it (the matched filter for that noise), and the
    match of a snippet with the filter is expressed in SDs of its match with noise alone.

    A spike found on the residual at the lower peeling threshold must match its unit's template
    ``min_z`` such SDs above noise. Events of noise alone can pass the network and the
    fit-share test (``unfitted``) and become spikes of the faintest units: per-channel noise
    levels do not separate them from the true spikes, the prewhitened match does
    (docs/design-decisions.md, § Peeling). The first pass's spikes are tested the same way on
    the traces (sort/assign.Assigner._significant), at the best match within a wider window: a
    unit detected on another channel than usual peaks several samples off its template's time.

    filters : (U, T, M) prewhitened templates on the templates' channels (0 where padded)
    null_sd : (U,) SD of a filter's output on noise (inf for a unit without a template)"""

    filters: np.ndarray
    null_sd: np.ndarray

    @classmethod
    def fit(
        cls, templates: Templates, covariance: np.ndarray, autocorrelation: np.ndarray
    ) -> "Significance":
        filters = np.zeros_like(templates.waveforms, dtype=np.float64)
        null_sd = np.full(len(filters), np.inf)
        span = templates.waveforms.shape[1]
        lags = np.abs(np.arange(span)[:, None] - np.arange(span)[None, :])
        rho = np.where(
            lags < len(autocorrelation),
            autocorrelation[np.minimum(lags, len(autocorrelation) - 1)],
            0.0,
        )
        rho_reg = rho + 1e-2 * np.eye(
            span
        )  # ridge: the band-passed noise's autocorrelation matrix is near-singular
        for unit in np.flatnonzero(templates.defined):
            real = templates.channels[unit] >= 0
            channels = templates.channels[unit][real]
            local = covariance[np.ix_(channels, channels)]
            local = local + 1e-3 * np.trace(local) / len(local) * np.eye(
                len(local)
            )  # ridge: near-singular after CMR
            wave = templates.waveforms[unit][:, real].astype(np.float64)
            whitened = np.linalg.solve(
                rho_reg, np.linalg.solve(local, wave.T).T
            )  # (T, m): (rho x covariance)^-1 wave
            filters[unit][:, real] = whitened
            # var(<noise, filter>) = filter . (rho x covariance) filter = filter . wave
            null_sd[unit] = np.sqrt(max(float((whitened * wave).sum()), 1e-12))
        return cls(filters.astype(np.float32), null_sd)

    def z(
        self,
        traces: np.ndarray,
        rows: np.ndarray,
        units: np.ndarray,
        channels: np.ndarray,
        before: int,
        max_shift: int = max(SHIFTS),
    ) -> np.ndarray:
        """(n,) match of each spike at ``rows`` with its unit's filter, the best within
        ``max_shift`` samples of it, in noise SDs; ``channels``: (U, M) the templates' channels."""
        if len(rows) == 0:
            return np.full(0, -np.inf)
        filters = self.filters[units]  # (n, T, M)
        span = filters.shape[1]
        times = np.clip(
            rows[:, None] + np.arange(-before - max_shift, span - before + max_shift)[None, :],
            0,
            len(traces) - 1,
        )
        window = traces[
            times[:, :, None], np.maximum(channels[units], 0)[:, None, :]
        ]  # (n, T + 2 max_shift, M)
        shifted = np.lib.stride_tricks.sliding_window_view(
            window, span, axis=1
        )  # (n, shifts, M, T), a view
        return np.einsum("nsmt,ntm->ns", shifted, filters).max(axis=1) / self.null_sd[units]


def subtract(
    traces: np.ndarray, rows: np.ndarray, units: np.ndarray, templates: Templates, before: int
) -> tuple[np.ndarray, np.ndarray]:
    """(residual traces, (T, C) bool: where something was subtracted) after removing, for every
    spike at ``rows`` of ``units``, its unit's template scaled by least squares to the spike."""
    residual = traces.copy()
    changed = np.zeros(traces.shape, bool)
    has = templates.defined[units] if len(units) else np.zeros(0, bool)
    if not has.any():
        return residual, changed
    p = place(traces, rows[has], units[has], templates, before)
    t_idx = np.broadcast_to(p.times[:, :, None], p.shape.shape)
    c_idx = np.broadcast_to(p.channels[:, None, :], p.shape.shape)
    keep = np.broadcast_to(p.real[:, None, :], p.shape.shape)
    # overlapping templates add up: bincount sums repeated (time, channel) positions
    # (np.subtract.at does too but is far slower)
    flat = (t_idx * traces.shape[1] + c_idx)[keep]
    removed = np.bincount(
        flat, weights=(p.scale[:, None, None] * p.shape)[keep], minlength=traces.size
    )
    residual -= removed.reshape(traces.shape).astype(traces.dtype)
    changed.flat[flat] = True
    return residual, changed


def unfitted(
    traces: np.ndarray,
    rows: np.ndarray,
    units: np.ndarray,
    templates: Templates,
    before: int,
    min_fit: float,
) -> np.ndarray:
    """``units`` with -1 where the unit's template, scaled by least squares within SCALE_RANGE,
    removes less than ``min_fit`` of its own energy from ``traces`` at the spike: what is left of
    an imperfectly subtracted spike is detected on the residual too and can look like a
    neighbouring unit to the network, but no unit's template fits it. Units without a template
    are kept."""
    units = units.copy()
    rows_fitted = np.flatnonzero(units >= 0)
    rows_fitted = rows_fitted[templates.defined[units[rows_fitted]]]
    if len(rows_fitted):
        placed = place(traces, rows[rows_fitted], units[rows_fitted], templates, before)
        units[rows_fitted[placed.gain < min_fit * placed.energy]] = -1
    return units


def rescue(
    traces: np.ndarray,
    rows: np.ndarray,
    proba: np.ndarray,
    units: np.ndarray,
    templates: Templates,
    before: int,
    min_probability: float,
    min_fit: float,
    span: int,
    shortlist: int = 3,
) -> np.ndarray:
    """``units`` with the candidates the network left unassigned (-1) given, where one fits, to
    the unit whose template removes the most energy at the spike among the candidate's
    ``shortlist`` most probable units (``proba``: (n, U), each at least ``min_probability``); it
    must remove at least ``min_fit`` of its own energy. Where two spikes overlap, the window holds
    both and the network passes no unit, but the larger spike's template still fits it, and once
    it is subtracted the smaller one is found on the residual. A unit that already fires within
    ``span`` samples is not given the candidate (its leftover), and of two candidates given to one
    unit within ``span`` (one spike detected on two channels) the better fitted is kept."""
    units = units.copy()
    open_rows = np.flatnonzero(units < 0)
    if len(open_rows) == 0 or proba.shape[1] == 0:
        return units
    chances = proba[open_rows]
    ranked = np.argsort(-chances, axis=1)[:, :shortlist]
    best_gain, best_unit = np.full(len(open_rows), -np.inf), np.full(len(open_rows), -1)
    for rank in range(ranked.shape[1]):
        unit = ranked[:, rank]
        tried = np.flatnonzero(
            (chances[np.arange(len(unit)), unit] >= min_probability) & templates.defined[unit]
        )
        if len(tried) == 0:
            continue
        placed = place(traces, rows[open_rows[tried]], unit[tried], templates, before)
        gain = np.where(placed.gain >= min_fit * placed.energy, placed.gain, -np.inf)
        better = gain > best_gain[tried]
        best_gain[tried[better]], best_unit[tried[better]] = gain[better], unit[tried[better]]
    taken = units >= 0
    best_unit = unexplained(rows[open_rows], best_unit, rows[taken], units[taken], span)
    units[open_rows] = _best_within(rows[open_rows], best_unit, best_gain, span)
    return units


def adopt(
    snippets: np.ndarray,
    channels: np.ndarray,
    units: np.ndarray,
    open_rows: np.ndarray,
    templates: Templates,
    min_fit: float,
    noise: np.ndarray,
    max_residual: float,
    min_coverage: float = 0.7,
    max_shift: int = 2,
) -> np.ndarray:
    """``units`` with the spikes at ``open_rows`` given to the unit whose template removes the
    most energy from their snippet, where it removes at least ``min_fit`` of its own energy and
    leaves at most ``max_residual`` times the energy that noise alone (``noise``: (C,) SD per
    channel) would have on the footprint: the template explains the whole spike, not a part of
    a larger or overlapping one (the fit alone also lets through many spikes of other units or
    of noise, which the residual test removes; docs/design-decisions.md, § Clustering).

    Clustering leaves out a unit's spikes that were detected on another channel than usual
    (their centre-channel features differ), and the network, which sees windows around the
    detection channel, then never learns that the unit appears there: most unclustered true
    spikes are centred away from their unit's usual channel, and the network gives them to
    whichever unit was clustered on that channel. Templates live on fixed probe channels, so
    they recognise such spikes.

    snippets : (n, T, M) µV on each spike's footprint ``channels`` (n, M), -1 padded. A unit is a
    candidate for a spike when at least ``min_coverage`` of its template energy lies on the
    spike's footprint; the template may move up to ``max_shift`` samples."""
    units = units.copy()
    if len(open_rows) == 0 or not templates.defined.any():
        return units
    span = snippets.shape[1] - 2 * max_shift
    x = snippets[open_rows, max_shift : max_shift + span].astype(np.float32)  # (r, S, M)
    best_gain, best_unit = np.full(len(open_rows), -np.inf), np.full(len(open_rows), -1)
    footprint = channels[open_rows]  # (r, M)
    for unit in np.flatnonzero(templates.defined):
        real = templates.channels[unit] >= 0
        slot = np.full(int(max(templates.channels[unit].max(), channels.max())) + 2, -1)
        slot[templates.channels[unit][real]] = np.flatnonzero(real)
        where = np.where(
            footprint >= 0, slot[footprint], -1
        )  # (r, M) the template's slot for each footprint channel, -1: none
        wave = templates.waveforms[unit]
        per_channel = np.append((wave**2).sum(axis=0), 0.0)  # slot -1 reads the appended 0
        rows = np.flatnonzero(
            per_channel[where].sum(axis=1) >= 0.9 * min_coverage * per_channel.sum()
        )  # worth the exact test
        if len(rows) == 0:
            continue
        where, spikes = where[rows], x[rows]
        covered = where >= 0
        for shift in range(-max_shift, max_shift + 1):
            part = wave[max_shift + shift : max_shift + shift + span]  # (S, M_u)
            total = float((part**2).sum())
            shape = np.where(
                covered[:, None, :], part[:, np.maximum(where, 0)].transpose(1, 0, 2), 0.0
            )  # (r, S, M)
            energy = np.einsum("rsm,rsm->r", shape, shape)
            projection = np.einsum("rsm,rsm->r", spikes, shape)
            scale = np.clip(projection / np.maximum(energy, 1e-9), *SCALE_RANGE)
            gain = 2 * scale * projection - scale**2 * energy
            fits = (
                (energy >= min_coverage * total)
                & (gain >= min_fit * energy)
                & (gain > best_gain[rows])
            )
            best_gain[rows[fits]], best_unit[rows[fits]] = gain[fits], unit
    expected = span * np.where(
        channels[open_rows] >= 0, noise[np.maximum(channels[open_rows], 0)] ** 2, 0
    ).sum(axis=1)
    residual = (x.astype(np.float64) ** 2).sum(axis=(1, 2)) - best_gain
    explained = (best_unit >= 0) & (residual <= max_residual * expected)
    units[open_rows] = np.where(explained, best_unit, units[open_rows])
    return units


def _best_within(
    samples: np.ndarray, units: np.ndarray, strength: np.ndarray, span: int
) -> np.ndarray:
    """``units`` with -1 where a stronger candidate of the same unit lies within ``span``
    samples."""
    units = units.copy()
    order = np.flatnonzero(units >= 0)
    order = order[np.lexsort((samples[order], units[order]))]  # by unit, then time
    while len(order) > 1:
        a, b = order[:-1], order[1:]
        clash = (units[a] == units[b]) & (samples[b] - samples[a] <= span)
        if not clash.any():
            break
        weaker = np.where(strength[a[clash]] >= strength[b[clash]], b[clash], a[clash])
        units[weaker] = -1
        order = order[units[order] >= 0]
    return units


def unclaimed(
    shape: tuple, rows: np.ndarray, channels: np.ndarray, neighbours: np.ndarray, sweep: int
) -> np.ndarray:
    """(T, C) bool: where the first pass's detection found no candidate, i.e. farther than
    ``sweep`` samples or than the detection radius (``neighbours``, (C, M) -1 padded) from every
    candidate at ``rows``, ``channels``. A residual candidate there is new even though nothing
    was subtracted; elsewhere it is the first pass's candidate again."""
    free = np.ones(shape, bool)
    if len(rows) == 0:
        return free
    times = np.clip(
        rows[:, None] + np.arange(-sweep, sweep + 1)[None, :], 0, shape[0] - 1
    )  # (n, W)
    near = neighbours[channels]  # (n, M)
    t_idx = np.broadcast_to(times[:, :, None], times.shape + near.shape[1:])
    c_idx = np.broadcast_to(near[:, None, :], t_idx.shape)
    real = c_idx >= 0
    free[t_idx[real], c_idx[real]] = False
    return free


def unexplained(
    samples: np.ndarray,
    units: np.ndarray,
    first_samples: np.ndarray,
    first_units: np.ndarray,
    span: int,
) -> np.ndarray:
    """``units`` of the candidates found on the residual, with -1 where the same unit already
    has a spike within ``span`` samples: what is left of an imperfectly subtracted spike looks
    like its own unit, and a unit does not fire twice within one snippet."""
    units = units.copy()
    if len(first_samples) == 0:
        return units
    # one sorted key per (unit, time): a window query per candidate is two binary searches
    stride = int(max(samples.max(initial=0), first_samples.max()) + 2 * span + 1)
    keys = np.sort(first_units.astype(np.int64) * stride + first_samples)
    query = units.astype(np.int64) * stride + samples
    near = np.searchsorted(keys, query + span, side="right") - np.searchsorted(
        keys, query - span, side="left"
    )
    units[(units >= 0) & (near > 0)] = -1
    return units
