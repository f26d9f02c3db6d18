"""A self-contained HTML report of a locsort run: summary tables and PNG figures.

``write_report(folder, recording=..., spikes=..., sorting=...)`` writes ``folder/report.html``
and ``folder/figures/*.png`` (referenced by relative path) and returns the html path.

Figures are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot
figure is ever created, the caller's backend and pyplot state are untouched. Every figure is
made inside its own ``try``: a failing figure is logged and reported in the page, it never
stops the report. Trace reads (for the templates) are bounded by a number of reads and a time
budget, independent of the recording's duration.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import logging
import math
import time
from pathlib import Path

import numpy as np

from . import curate
from .neighbourhood import shank_ids

logger = logging.getLogger(__name__)

DPI = 110
MAX_TEMPLATE_UNITS = 64  # units drawn in templates.png, largest median |amplitude| first
TEMPLATE_SPIKES_PER_UNIT = (
    100  # random spikes averaged per unit (fewer if the unit has fewer or the reads run out)
)
TEMPLATE_TIME_BUDGET_S = 30.0  # stop reading traces after this and average what was read
TEMPLATE_MS_BEFORE, TEMPLATE_MS_AFTER = curate.WAVEFORM_MS  # the analyzer's window
TEMPLATE_MAX_CHANNELS = 16  # channels drawn around each unit's largest channel
MAX_UNIT_PANELS = 24  # per-unit panels drawn (~0.1 s each): half to flagged units at most
CORRELOGRAM_MS = 50.0  # the ISI histogram and the autocorrelogram span 0 to 50 ms
PANEL_MAX_POINTS = 2_000  # spikes drawn per unit in its amplitude and location panels
ZOOM_HEIGHT_UM = 400.0  # height of the zoomed panel of locations.png on long probes
GT_TOLERANCE_MS = 0.4
ACCURACY_THRESHOLD = 0.8
UNASSIGNED_COLOR = (0.72, 0.72, 0.72, 1.0)

__all__ = ["write_report"]


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def write_report(
    folder: Path,
    *,
    recording,
    spikes: np.ndarray,
    sorting,
    title: str = "locsort run",
    timings: dict | None = None,
    evaluation: dict | None = None,
    ground_truth=None,
    params: dict | None = None,
    max_spikes_plotted: int = 50_000,
    seed: int = 0,
    run_notes: list[str] | None = None,
    motion=None,
    analyzer=None,
    units=None,
) -> Path:
    """Write ``folder/report.html`` and its figures (``folder/figures/*.png``); return the html
    path.

    ``spikes`` is a locsort spike array (``locsort.spikes.SPIKE_DTYPE``), possibly empty;
    ``sorting`` the sorting built from its assigned spikes (unit ids 0..U-1), possibly with no
    units. ``ground_truth`` (optional) has ``.sorting`` and ``.unit_locations`` ((U_gt, 3) µm,
    row i for ``sorting.unit_ids[i]``). ``evaluation`` (optional) is rendered as tables, and
    ``evaluation["sorting"]["accuracy_per_unit"]`` drawn when ground truth is given. ``run_notes``
    (optional) are what the run itself has to say (interpolated channels, fallbacks), shown first.
    ``motion`` (optional): the SpikeInterface Motion the recording was registered with, drawn on
    the drift map; spike locations are then drawn at their registered depth (``y_registered``).
    ``analyzer`` (optional): the run's SortingAnalyzer, whose templates are drawn; ``units``
    (optional): its units table (``locsort.curate.units_table``), shown with the quality labels.
    """
    folder = Path(folder)
    fig_dir = folder / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    spikes = _as_spike_array(spikes)
    rng = np.random.default_rng(seed)
    ctx = _Context(
        recording,
        spikes,
        sorting,
        max(int(max_spikes_plotted), 1),
        rng,
        _constants(params).shank_gap_um,
    )
    ctx.analyzer, ctx.units = analyzer, units

    figures: list[tuple[str, str, str]] = []  # (file name, caption, alt)
    notes: list[str] = list(run_notes or [])

    def attempt(name: str, func, caption: str, alt: str, *args):
        path = fig_dir / name
        try:
            made = func(path, ctx, *args)
        except Exception as exc:  # a figure must never stop the report
            logger.warning("report: figure %s failed: %s", name, exc, exc_info=True)
            notes.append(f"Figure {name} could not be made ({type(exc).__name__}: {exc}).")
            path.unlink(missing_ok=True)
            return
        if made is None or made is False:
            path.unlink(missing_ok=True)
            return
        extra = made if isinstance(made, str) else ""
        figures.append((name, caption + (" " + extra if extra else ""), alt))

    n_spikes = len(spikes)
    if n_spikes == 0:
        notes.append("No spikes detected.")
    elif not ctx.finite_xy.any():
        notes.append("No spike has a finite (x, y) location.")

    registered = " (y with the probe's motion removed)" if motion is not None else ""
    attempt(
        "locations.png",
        _figure_locations,
        f"Spike locations (x, y{registered}) on the probe, coloured by unit (grey: unassigned)"
        + (", black crosses: true unit positions" if ground_truth is not None else "")
        + f"; a random subset of at most {ctx.max_plotted:,} spikes.",
        "spike locations on the probe",
        ground_truth,
    )
    if ctx.num_units > 0 and n_spikes > 0:
        attempt(
            "templates.png",
            _figure_templates,
            "Mean waveform (±1 SD band) of each unit on the channels around its largest channel, "
            f"drawn at the channel positions ({TEMPLATE_MS_BEFORE:g} ms before to "
            f"{TEMPLATE_MS_AFTER:g} ms after the spike; waveforms scaled per unit, the title gives "
            "the peak amplitude).",
            "unit templates on the probe layout",
        )
    elif n_spikes > 0:
        notes.append("No units: no templates drawn.")
    if n_spikes > 0:
        attempt(
            "activity.png",
            _figure_activity,
            "Activity over time: detection rate, firing rate of each unit "
            "(units sorted by mean y, top = largest y) "
            "and spike |amplitude| coloured by unit (subsampled).",
            "firing rates and amplitudes over time",
        )
    if n_spikes > 0:
        attempt(
            "drift.png",
            _figure_drift,
            "Drift map: each spike's depth against time, darker for larger spikes"
            + (
                ", as recorded (left, with the estimated motion drawn in red at the depths "
                "where it was estimated) and with the motion removed (right)."
                if motion is not None
                else "; no motion was corrected."
            ),
            "spike depth against time (drift map)",
            motion,
        )
    if ground_truth is not None:
        accuracy = _accuracy_per_unit(evaluation)
        if accuracy is not None:
            attempt(
                "accuracy.png",
                _figure_accuracy,
                "Sorting accuracy of each ground-truth unit, sorted; "
                f"dashed line at {ACCURACY_THRESHOLD:g}.",
                "accuracy per ground-truth unit",
                accuracy,
                ground_truth,
            )
        if n_spikes > 0:
            attempt(
                "errors.png",
                _figure_errors,
                "Localization error: 2-D distance between the true unit position and the closest "
                f"detected spike location within ±{GT_TOLERANCE_MS:g} ms "
                "of each ground-truth spike.",
                "histogram of localization errors",
                ground_truth,
                evaluation,
            )

    panels: list[tuple[int, str]] = []  # (unit id, figure file) of the per-unit panels
    if units is not None and analyzer is not None and len(units):
        panels = _figure_units(fig_dir, _panel_units(units), ctx, notes)

    page = _render_html(
        title=title,
        ctx=ctx,
        timings=timings,
        evaluation=evaluation,
        params=params,
        figures=figures,
        notes=notes,
        has_ground_truth=ground_truth is not None,
        panels=panels,
    )
    html_path = folder / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path


# --------------------------------------------------------------------------------------------
# shared state
# --------------------------------------------------------------------------------------------


def _heat_map_order(ctx) -> tuple[np.ndarray, np.ndarray]:
    """(the units with spikes, by shank and then by mean y; each unit's shank)."""
    active = np.flatnonzero(ctx.unit_counts > 0)
    depth = np.full(len(active), np.nan)
    idx = np.flatnonzero(ctx.assigned & ctx.finite_xy)
    if len(idx) and len(active):
        sums = np.bincount(ctx.unit_index[idx], weights=ctx.y[idx], minlength=ctx.num_units)
        cnt = np.bincount(ctx.unit_index[idx], minlength=ctx.num_units)
        with np.errstate(invalid="ignore", divide="ignore"):
            depth = (sums / cnt)[active]
    unit_shank = _unit_shanks(ctx)
    key = np.where(np.isfinite(depth), depth, np.inf)
    return active[np.lexsort((active, key, unit_shank[active]))], unit_shank


def _unit_shanks(ctx) -> np.ndarray:
    """(units,) the shank most of each unit's spikes were detected on, as the sort read the
    probe (named shanks, or the gaps between contact columns)."""
    from .sort.postprocess import home_shanks

    shanks = ctx.channel_shank[ctx.spikes["channel_index"]]
    return home_shanks(ctx.unit_index, shanks, ctx.num_units)


class _Context:
    """Quantities several figures and tables need, computed once."""

    def __init__(self, recording, spikes, sorting, max_plotted, rng, shank_gap_um=None):
        from .constants import Constants

        self.recording = recording
        self.spikes = spikes
        self.sorting = sorting
        self.max_plotted = max_plotted
        self.rng = rng
        self.fs = float(recording.get_sampling_frequency())
        self.num_segments = int(recording.get_num_segments())
        self.segment_samples = np.array(
            [int(recording.get_num_samples(segment_index=s)) for s in range(self.num_segments)],
            dtype=np.int64,
        )
        self.segment_offset_s = np.concatenate(
            [[0.0], np.cumsum(self.segment_samples)[:-1] / self.fs]
        )
        self.duration_s = float(self.segment_samples.sum() / self.fs)
        self.num_channels = int(recording.get_num_channels())
        self.channel_xy = np.asarray(recording.get_channel_locations(), dtype=float)[:, :2]
        gap = Constants().shank_gap_um if shank_gap_um is None else shank_gap_um
        self.channel_shank, _ = shank_ids(recording, gap)  # as the sort read the probe
        try:
            self.probegroup = recording.get_probegroup()
        except Exception:
            self.probegroup = None
        self.notes_templates = ""
        self.analyzer = self.units = None  # the run's SortingAnalyzer and units table

        n = len(spikes)
        seg = np.clip(spikes["segment_index"].astype(np.int64), 0, max(self.num_segments - 1, 0))
        self.spike_seg = seg
        self.times_s = spikes["sample_index"] / self.fs + (self.segment_offset_s[seg] if n else 0.0)
        self.x = spikes["x"].astype(float)
        self.recorded_y = spikes["y"].astype(float)
        names = spikes.dtype.names
        self.y = spikes["y_registered" if "y_registered" in names else "y"].astype(float)
        self.finite_xy = np.isfinite(self.x) & np.isfinite(self.y)
        self.abs_amp = np.abs(spikes["amplitude"].astype(float))
        units = spikes["unit_index"].astype(np.int64)
        self.unit_index = units
        try:
            sorting_units = len(sorting.unit_ids)
        except Exception:
            sorting_units = 0
        self.num_sorting_units = int(sorting_units)
        self.num_units = int(max(sorting_units, (units.max() + 1) if n and units.max() >= 0 else 0))
        assigned = units >= 0
        self.assigned = assigned
        self.unit_counts = (
            np.bincount(units[assigned], minlength=self.num_units)
            if self.num_units
            else np.zeros(0, int)
        )
        self.unit_colors = _unit_colors(self.num_units)
        # one random subset of spikes for every scatter plot
        if n > max_plotted:
            self.plot_subset = np.sort(rng.choice(n, size=max_plotted, replace=False))
        else:
            self.plot_subset = np.arange(n)

    def spike_colors(self, idx: np.ndarray) -> np.ndarray:
        colors = np.tile(np.array(UNASSIGNED_COLOR), (len(idx), 1))
        units = self.unit_index[idx]
        ok = (units >= 0) & (units < self.num_units)
        if ok.any():
            colors[ok] = self.unit_colors[units[ok]]
        return colors

    def sorting_spike_counts(self) -> np.ndarray:
        try:
            counts = self.sorting.count_num_spikes_per_unit(outputs="array")
            return np.asarray(counts, dtype=np.int64)
        except Exception:
            return self.unit_counts


def _as_spike_array(spikes) -> np.ndarray:
    spikes = np.asarray(spikes)
    if spikes.dtype.names is None:
        raise TypeError("spikes must be a structured array with locsort's spike fields")
    needed = {
        "sample_index": np.int64,
        "segment_index": np.int32,
        "channel_index": np.int32,
        "amplitude": np.float32,
        "x": np.float32,
        "y": np.float32,
        "y_registered": np.float32,
        "unit_index": np.int32,
    }
    missing = [name for name in needed if name not in spikes.dtype.names]
    if not missing:
        return spikes.reshape(-1)
    # tolerate partial arrays (e.g. only detection output): fill what is missing
    out = np.zeros(spikes.size, dtype=[(k, v) for k, v in needed.items()])
    for name in needed:
        if name in spikes.dtype.names:
            out[name] = spikes[name].reshape(-1)
        elif name == "y_registered" and "y" in spikes.dtype.names:
            out[name] = spikes["y"].reshape(-1)
        elif name in ("x", "y", "y_registered", "amplitude"):
            out[name] = np.nan
        elif name == "unit_index":
            out[name] = -1
    return out


def _unit_colors(n: int) -> np.ndarray:
    """A qualitative palette without greys (grey means unassigned), cycled."""
    from matplotlib import colormaps

    base = []
    for name, skip in (("tab10", {7}), ("Dark2", {7}), ("Set1", {5, 8})):
        cmap = colormaps[name]
        base += [cmap(i) for i in range(cmap.N) if i not in skip]
    base = np.array(base)
    if n <= 0:
        return np.zeros((0, 4))
    return base[np.arange(n) % len(base)]


# --------------------------------------------------------------------------------------------
# matplotlib helpers (no pyplot)
# --------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(float(width_in), float(height_in)), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    try:
        fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    finally:
        fig.clear()


def _message_axes(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.3"
    )
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------------------------
# locations.png
# --------------------------------------------------------------------------------------------


def _draw_probe(ax, ctx: _Context) -> None:
    drawn = False
    if ctx.probegroup is not None:
        try:
            from probeinterface.plotting import plot_probe

            for probe in ctx.probegroup.probes:
                if probe.ndim != 2:
                    raise ValueError("3-D probe")
                kwargs = {}
                if probe.contact_sides is not None:
                    kwargs["side"] = "front"
                plot_probe(
                    probe,
                    ax=ax,
                    title=False,
                    contacts_colors="#d9c58c",
                    contact_kwargs=dict(alpha=0.8, edgecolor="0.55", lw=0.3, zorder=1),
                    probe_shape_kwargs=dict(
                        facecolor="#eeeeee", edgecolor="0.6", lw=0.6, alpha=1.0, zorder=0
                    ),
                    **kwargs,
                )
            drawn = True
        except Exception as exc:
            logger.debug("report: plot_probe failed (%s), drawing contacts as squares", exc)
    if not drawn:
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Rectangle

        size = 0.6 * _contact_pitch(ctx.channel_xy)
        patches = [
            Rectangle((cx - size / 2, cy - size / 2), size, size) for cx, cy in ctx.channel_xy
        ]
        ax.add_collection(
            PatchCollection(patches, facecolor="#d9c58c", edgecolor="0.55", lw=0.3, zorder=1)
        )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title("")


def _contact_pitch(xy: np.ndarray) -> float:
    if len(xy) < 2:
        return 20.0
    d = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=2) if len(xy) <= 2000 else None
    if d is None:
        sub = xy[:2000]
        d = np.linalg.norm(sub[:, None, :] - sub[None, :, :], axis=2)
    d[d == 0] = np.inf
    pitch = float(np.median(d.min(axis=1)))
    return pitch if np.isfinite(pitch) and pitch > 0 else 20.0


def _densest_window(y: np.ndarray, height: float, lo: float, hi: float) -> tuple[float, float]:
    """[y0, y0 + height] within [lo, hi] holding the most values of ``y``."""
    if hi - lo <= height or len(y) == 0:
        mid = (lo + hi) / 2 if len(y) == 0 else float(np.median(y))
        y0 = min(max(mid - height / 2, lo), hi - height) if hi - lo > height else lo
        return y0, y0 + height
    step = 10.0
    edges = np.arange(lo, hi + step, step)
    counts, _ = np.histogram(np.clip(y, lo, hi), bins=edges)
    k = max(int(round(height / step)), 1)
    sums = np.convolve(counts, np.ones(k), mode="valid")
    start = int(np.argmax(sums))
    y0 = float(edges[start])
    y0 = min(y0, hi - height)
    return y0, y0 + height


def _figure_locations(path: Path, ctx: _Context, ground_truth) -> bool:
    xy = ctx.channel_xy
    if len(xy) == 0:
        return False
    pitch = _contact_pitch(xy)
    margin = max(2 * pitch, 30.0)
    px0, px1 = float(xy[:, 0].min()), float(xy[:, 0].max())
    py0, py1 = float(xy[:, 1].min()), float(xy[:, 1].max())
    x_lo, x_hi = px0 - margin, px1 + margin
    y_lo, y_hi = py0 - margin, py1 + margin
    fin = np.flatnonzero(ctx.finite_xy)
    if len(fin):
        # widen to the bulk of the spike cloud, but never far beyond the probe
        qx = np.percentile(ctx.x[fin], [0.5, 99.5])
        x_lo = min(x_lo, max(float(qx[0]) - 10, px0 - 150))
        x_hi = max(x_hi, min(float(qx[1]) + 10, px1 + 150))
    gt_xy = None
    if ground_truth is not None:
        try:
            gt_xy = np.asarray(ground_truth.unit_locations, dtype=float)[:, :2]
            gt_xy = gt_xy[np.all(np.isfinite(gt_xy), axis=1)]
            if len(gt_xy):
                x_lo = min(x_lo, max(float(gt_xy[:, 0].min()) - 10, px0 - 150))
                x_hi = max(x_hi, min(float(gt_xy[:, 0].max()) + 10, px1 + 150))
        except Exception:
            gt_xy = None

    width_um = x_hi - x_lo
    height_um = y_hi - y_lo
    zoom = None
    if height_um > 1.5 * ZOOM_HEIGHT_UM + 2 * margin and len(fin):
        zoom = _densest_window(ctx.y[fin], ZOOM_HEIGHT_UM, y_lo, y_hi)

    # layout in inches: each panel's box has its data's aspect ratio
    panel_h = 9.0 if zoom is not None or height_um > 1.2 * width_um else 6.5
    max_panel_w = 12.0
    panels = [(x_lo, x_hi, y_lo, y_hi, "full probe")]
    if zoom is not None:
        panels.append((x_lo, x_hi, zoom[0], zoom[1], f"densest {ZOOM_HEIGHT_UM:.0f} µm"))
    sizes = []
    for a, b, c, d, _ in panels:
        scale = min(panel_h / (d - c), max_panel_w / (b - a))
        sizes.append(((b - a) * scale, (d - c) * scale))
    left, right, gap, top, bottom = 0.9, 0.3, 0.9, 0.75, 0.6
    fig_w = left + right + sum(w for w, _ in sizes) + gap * (len(sizes) - 1)
    fig_w = max(fig_w, 4.5)
    fig_h = bottom + top + max(h for _, h in sizes)
    fig = _new_figure(fig_w, fig_h)

    sub = ctx.plot_subset[ctx.finite_xy[ctx.plot_subset]]
    order = ctx.rng.permutation(len(sub))
    unassigned = sub[ctx.unit_index[sub] < 0]
    assigned = sub[order][ctx.unit_index[sub[order]] >= 0]
    n_pts = len(sub)
    dot = 6.0 if n_pts < 2_000 else 3.0 if n_pts < 20_000 else 1.5
    alpha = 0.8 if n_pts < 20_000 else 0.5

    x_cursor = left
    for k, ((a, b, c, d, label), (w, h)) in enumerate(zip(panels, sizes)):
        ax = fig.add_axes([x_cursor / fig_w, bottom / fig_h, w / fig_w, h / fig_h])
        x_cursor += w + gap
        _draw_probe(ax, ctx)
        if len(unassigned):
            ax.scatter(
                ctx.x[unassigned],
                ctx.y[unassigned],
                s=dot,
                c=[UNASSIGNED_COLOR],
                alpha=alpha,
                linewidths=0,
                zorder=2,
                rasterized=True,
            )
        if len(assigned):
            ax.scatter(
                ctx.x[assigned],
                ctx.y[assigned],
                s=dot,
                c=ctx.spike_colors(assigned),
                alpha=alpha,
                linewidths=0,
                zorder=3,
                rasterized=True,
            )
        if gt_xy is not None and len(gt_xy):
            ax.scatter(
                gt_xy[:, 0],
                gt_xy[:, 1],
                marker="x",
                s=45,
                c="black",
                linewidths=1.6,
                zorder=5,
                label="true unit position",
            )
        if ctx.num_units and ctx.num_units <= 40 and k == len(panels) - 1 and len(assigned):
            _label_units(ax, ctx, assigned, (a, b, c, d))
        if len(ctx.spikes) == 0:
            _panel_text(ax, "no spikes detected")
        elif len(fin) == 0:
            _panel_text(ax, "no finite spike locations")
        ax.set_xlim(a, b)
        ax.set_ylim(c, d)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x (µm)", fontsize=9)
        if k == 0:
            ax.set_ylabel("y (µm, along the shank)", fontsize=9)
        ax.set_title(label, fontsize=10)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=max(2, int(w / 0.7)), integer=True))
        ax.tick_params(labelsize=8)
        if zoom is not None and k == 0:
            from matplotlib.patches import Rectangle

            ax.add_patch(
                Rectangle(
                    (a, zoom[0]),
                    b - a,
                    zoom[1] - zoom[0],
                    fill=False,
                    edgecolor="red",
                    lw=1.0,
                    zorder=6,
                )
            )
    shown = len(sub)
    outside = 0
    if shown:
        outside = int(
            np.sum(
                (ctx.x[sub] < x_lo)
                | (ctx.x[sub] > x_hi)
                | (ctx.y[sub] < y_lo)
                | (ctx.y[sub] > y_hi)
            )
        )
    head = (
        f"{len(ctx.spikes):,} spikes, {ctx.num_sorting_units} units; "
        f"{shown:,} located spikes plotted"
    )
    if outside:
        head += f" ({outside:,} outside the frame)"
    fig.text(0.5, 1 - 0.25 / fig_h, head, ha="center", va="top", fontsize=9)
    _save(fig, path)
    return True


def _panel_text(ax, text):
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=10,
        color="0.25",
        rotation=90 if ax.get_position().height > 2 * ax.get_position().width else 0,
        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"),
        zorder=10,
    )


def _label_units(ax, ctx: _Context, idx: np.ndarray, limits) -> None:
    import matplotlib.patheffects as pe

    a, b, c, d = limits
    units = ctx.unit_index[idx]
    for u in np.unique(units):
        members = idx[units == u]
        mx, my = float(np.median(ctx.x[members])), float(np.median(ctx.y[members]))
        if a <= mx <= b and c <= my <= d:
            ax.annotate(
                str(int(u)),
                (mx, my),
                xytext=(7, 5),
                textcoords="offset points",
                fontsize=7,
                fontweight="bold",
                color=ctx.unit_colors[u],
                ha="left",
                va="bottom",
                zorder=7,
                path_effects=[pe.withStroke(linewidth=2, foreground="white")],
                annotation_clip=True,
            )


# --------------------------------------------------------------------------------------------
# templates.png
# --------------------------------------------------------------------------------------------


def _select_template_units(ctx: _Context) -> np.ndarray:
    units = np.flatnonzero(ctx.unit_counts > 0)
    if len(units) == 0:
        return units
    amp = np.full(len(units), -np.inf)
    assigned_idx = np.flatnonzero(ctx.assigned)
    if len(assigned_idx):
        order = assigned_idx[np.argsort(ctx.unit_index[assigned_idx], kind="stable")]
        sorted_units = ctx.unit_index[order]
        lows = np.searchsorted(sorted_units, units, side="left")
        highs = np.searchsorted(sorted_units, units, side="right")
        for i, (lo, hi) in enumerate(zip(lows, highs)):
            vals = ctx.abs_amp[order[lo:hi]]
            vals = vals[np.isfinite(vals)]
            amp[i] = np.median(vals) if len(vals) else -np.inf
    key = np.where(np.isfinite(amp), amp, -1.0)
    rank = np.lexsort((-ctx.unit_counts[units], -key))
    return units[rank][:MAX_TEMPLATE_UNITS]


def _template_reads(
    ctx: _Context, units: np.ndarray, nbefore: int, width: int
) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """Which traces to read for the templates: (segment, first frame, end frame, spike rows,
    their slots in ``units``) per read, at most ``curate.MAX_READS`` reads, at most
    ``TEMPLATE_SPIKES_PER_UNIT`` spikes per unit (``curate.spike_reads``)."""
    spikes = ctx.spikes
    slot_of_unit = np.full(
        ctx.num_units + 1, -1, np.int64
    )  # unit index -> slot; the last entry serves -1 (unassigned)
    slot_of_unit[units] = np.arange(len(units))
    seg_len = ctx.segment_samples[ctx.spike_seg] if len(spikes) else np.zeros(0, np.int64)
    start = spikes["sample_index"].astype(np.int64) - nbefore
    valid = (start >= 0) & (start + width <= seg_len) & (spikes["segment_index"] >= 0)
    valid &= (spikes["segment_index"] < ctx.num_segments) & (slot_of_unit[ctx.unit_index] >= 0)
    rows = np.flatnonzero(valid)
    reads = curate.spike_reads(
        ctx.spike_seg[rows],
        start[rows],
        slot_of_unit[ctx.unit_index[rows]],
        np.full(len(units), TEMPLATE_SPIKES_PER_UNIT, np.int64),
        width,
        max(int(curate.READ_S * ctx.fs), width),
        int(curate.READ_GAP_S * ctx.fs),
        curate.MAX_READS,
        ctx.rng,
    )
    return [(seg, first, end, rows[chosen], slots) for seg, first, end, chosen, slots in reads]


def _compute_templates(ctx: _Context, units: np.ndarray):
    """Mean and SD waveform (samples, channels) of each unit, and how many spikes each
    averages: the analyzer's templates when the run made one, else from bounded trace reads
    (``_template_reads``)."""
    if ctx.analyzer is not None:
        return _analyzer_templates(ctx.analyzer, units)
    rec, fs = ctx.recording, ctx.fs
    nbefore = max(int(round(TEMPLATE_MS_BEFORE * fs / 1000)), 1)
    nafter = max(int(round(TEMPLATE_MS_AFTER * fs / 1000)), 1)
    width = nbefore + nafter
    n_ch = ctx.num_channels
    sums = np.zeros((len(units), width, n_ch))
    sq = np.zeros((len(units), width, n_ch))
    counts = np.zeros(len(units), dtype=np.int64)
    if len(ctx.spikes) == 0:
        return sums, sums, counts, nbefore
    kw = {}
    try:
        if rec.get_dtype().kind != "f" and rec.has_scaleable_traces():
            kw["return_in_uV"] = True
    except Exception:
        pass
    from .runners import LocalRunner

    def windows_of(read):  # (spikes, width, channels) µV of one read's spikes
        segment, first, end, rows, _ = read
        traces = np.asarray(
            rec.get_traces(segment_index=segment, start_frame=first, end_frame=end, **kw),
            dtype=np.float64,
        )
        offsets = ctx.spikes["sample_index"][rows].astype(np.int64) - nbefore - first
        return traces[offsets[:, None] + np.arange(width)]

    t0 = time.perf_counter()
    reads = _template_reads(ctx, units, nbefore, width)
    # reads in one thread per core (filtering releases the GIL, so reads overlap), added in read
    # order so that the sums do not depend on which thread finished first
    arrived, added = {}, 0
    for n_read, windows in LocalRunner().map(
        windows_of, reads, list(range(len(reads))), progress=False
    ):
        arrived[n_read] = windows
        while added in arrived:
            slots, windows = reads[added][4], arrived.pop(added)
            np.add.at(sums, slots, windows)
            np.add.at(sq, slots, windows * windows)
            np.add.at(counts, slots, 1)
            added += 1
        if time.perf_counter() - t0 > TEMPLATE_TIME_BUDGET_S:
            ctx.notes_templates = (
                f"trace reading stopped after {TEMPLATE_TIME_BUDGET_S:g} s ({added} reads)"
            )
            logger.info("report: %s", ctx.notes_templates)
            break
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / np.maximum(counts, 1)[:, None, None]
        var = sq / np.maximum(counts, 1)[:, None, None] - mean**2
    sd = np.sqrt(np.clip(var, 0, None))
    return mean, sd, counts, nbefore


def _analyzer_templates(analyzer, units: np.ndarray):
    """``_compute_templates`` from a SortingAnalyzer's ``templates`` (dense, µV)."""
    extension = analyzer.get_extension("templates")
    slots = analyzer.sorting.ids_to_indices(units)
    mean = np.asarray(extension.get_data(operator="average"), float)[slots]
    sd = np.asarray(extension.get_data(operator="std"), float)[slots]
    kept = analyzer.sorting.to_spike_vector()["unit_index"][
        analyzer.get_extension("random_spikes").get_data()
    ]
    counts = np.bincount(kept, minlength=len(analyzer.unit_ids))[slots]
    return mean, sd, counts, extension.nbefore


def _draw_template(ax, ctx: _Context, tmpl: np.ndarray, sd: np.ndarray, color, t: np.ndarray):
    """A unit's mean waveform ``tmpl`` (samples, channels; ±``sd`` band) on the channels around
    its largest one, drawn at the channel positions (``t``: each sample's place in the window,
    0 at the spike); returns the largest channel and its signed peak."""
    from matplotlib.collections import LineCollection, PolyCollection

    xy = ctx.channel_xy
    peak_per_channel = np.abs(tmpl).max(axis=0)
    main = int(np.argmax(peak_per_channel))
    dist = np.linalg.norm(xy - xy[main], axis=1)
    near = np.argsort(dist, kind="stable")[:TEMPLATE_MAX_CHANNELS]
    near = near[dist[near] <= max(80.0, 2.5 * _contact_pitch(xy))]
    cx, cy = xy[near, 0], xy[near, 1]
    ux = np.unique(np.round(cx, 3))
    uy = np.unique(np.round(cy, 3))
    pitch_x = float(np.min(np.diff(ux))) if len(ux) > 1 else 20.0
    pitch_y = float(np.min(np.diff(uy))) if len(uy) > 1 else 20.0
    span_x = 0.85 * pitch_x
    amp = float(peak_per_channel[main]) or 1.0
    scale_y = 1.6 * pitch_y / amp
    # one collection for the waveforms and one for the ±SD bands (fast to draw); (channels,
    # samples), the spike time at the channel's x
    xs = cx[:, None] + t[None, :] * span_x
    wave = tmpl[:, near].T
    dev = sd[:, near].T
    mid = cy[:, None] + wave * scale_y
    lo, hi = mid - dev * scale_y, mid + dev * scale_y
    bands = [np.column_stack([np.r_[x, x[::-1]], np.r_[a, b[::-1]]]) for x, a, b in zip(xs, lo, hi)]
    ax.add_collection(PolyCollection(bands, facecolors=[color], alpha=0.18, linewidths=0))
    lines = [np.column_stack([x, m]) for x, m in zip(xs, mid)]
    widths = np.where(near == main, 1.3, 0.9)
    ax.add_collection(LineCollection(lines, colors=[color], linewidths=widths))
    ax.autoscale_view()
    signed_peak = float(tmpl[np.argmax(np.abs(tmpl[:, main])), main])
    return main, signed_peak


def _figure_templates(path: Path, ctx: _Context):
    units = _select_template_units(ctx)
    if len(units) == 0:
        return False
    mean, sd, counts, nbefore = _compute_templates(ctx, units)
    n = len(units)
    ncols = min(8, n)
    nrows = int(math.ceil(n / ncols))
    cell_w, cell_h = 1.9, 2.5
    top_in = 0.45
    fig_h = nrows * cell_h + top_in
    fig_w = max(ncols * cell_w + 0.3, 6.0)
    side = (fig_w - ncols * cell_w) / 2 / fig_w  # cells keep their width, centred
    fig = _new_figure(fig_w, fig_h)
    xy = ctx.channel_xy
    width = mean.shape[1]
    t = (np.arange(width) - nbefore) / width  # fraction of the window, 0 at the spike
    for k, u in enumerate(units):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.set_axis_off()
        color = ctx.unit_colors[u]
        if counts[k] == 0:
            ax.set_title(f"unit {u}", fontsize=8)
            ax.text(
                0.5,
                0.5,
                "no spike\nwindow read",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
            continue
        main, signed_peak = _draw_template(ax, ctx, mean[k], sd[k], color, t)
        ax.set_title(
            f"unit {u}  n={ctx.unit_counts[u]:,}\n{signed_peak:.0f} µV, y={xy[main, 1]:.0f} µm",
            fontsize=8,
        )
        ax.margins(x=0.05, y=0.05)
    note = (
        f"{n} of {int(np.sum(ctx.unit_counts > 0))} units shown "
        "(largest median |amplitude| first); "
        f"up to {int(counts.max())} spikes averaged per unit"
    )
    if ctx.notes_templates:
        note += "; " + ctx.notes_templates
    fig.text(0.5, 1 - 0.08 / fig_h, note, ha="center", va="top", fontsize=8)
    fig.subplots_adjust(
        left=side,
        right=1 - side,
        bottom=0.02 / fig_h * 2.5,
        top=1 - (top_in + 0.45) / fig_h,
        hspace=0.45 * 2.5 / cell_h,
        wspace=0.12,
    )
    _save(fig, path)
    return note + "."


# --------------------------------------------------------------------------------------------
# units: the quality table and one panel per unit
# --------------------------------------------------------------------------------------------


def _quality_counts(units) -> str:
    labels = units["quality"].to_numpy().astype(str)
    return " · ".join(f"{int(np.sum(labels == q))} {q}" for q in curate.QUALITY_LABELS)


def _panel_units(units) -> np.ndarray:
    """The units that get a panel: all of them up to ``MAX_UNIT_PANELS``; beyond, the flagged
    ones with the most spikes (at most half the panels), then the good ones, highest SNR
    first."""
    if len(units) <= MAX_UNIT_PANELS:
        return units["unit_id"].to_numpy(int)
    flagged = units[units["quality"] != "good"].sort_values("num_spikes", ascending=False)
    flagged = flagged[: MAX_UNIT_PANELS // 2]
    good = units[units["quality"] == "good"].sort_values("snr", ascending=False)
    good = good[: MAX_UNIT_PANELS - len(flagged)]
    return np.concatenate([good["unit_id"].to_numpy(int), flagged["unit_id"].to_numpy(int)])


def _figure_units(fig_dir: Path, units: np.ndarray, ctx: _Context, notes: list[str]):
    """``unit_N.png`` for each of ``units``: its template on the probe, ISI histogram,
    autocorrelogram, amplitude over time and location cloud; returns [(unit, file name)].
    One figure and its axes serve every unit (making axes costs more than drawing them), with
    ticks on the amplitudes alone and the other ranges in the titles (tick labels are what
    costs most to draw). A unit whose panel fails is named in ``notes``."""
    table = ctx.units.set_index("unit_id")
    mean, sd, _, nbefore = _analyzer_templates(ctx.analyzer, units)
    t = (np.arange(mean.shape[1]) - nbefore) / mean.shape[1]
    correlograms, bins = ctx.analyzer.get_extension("correlograms").get_data()
    edges = np.arange(0.0, CORRELOGRAM_MS + 0.5, 0.5)
    fig = _new_figure(11.0, 2.1)
    axes = fig.subplots(1, 5)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.03, top=0.76, wspace=0.16)
    made = []
    for k, unit in enumerate(units):
        name = f"unit_{unit}.png"
        try:
            row, mine = table.loc[unit], np.flatnonzero(ctx.unit_index == unit)
            _, peak = _draw_template(axes[0], ctx, mean[k], sd[k], ctx.unit_colors[unit], t)
            axes[0].set_title(f"template, peak {peak:.0f} µV", fontsize=8)
            axes[1].stairs(
                np.histogram(_intervals_ms(ctx, mine), edges)[0], edges, fill=True, color="0.4"
            )
            axes[1].axvline(curate.REFRACTORY_MS, color="r", lw=0.8)
            axes[1].set_title(
                f"ISI 0–{CORRELOGRAM_MS:g} ms (red: {curate.REFRACTORY_MS:g} ms)", fontsize=8
            )
            slot = int(ctx.analyzer.sorting.id_to_index(unit))
            axes[2].stairs(correlograms[slot, slot], bins, fill=True, color="0.4")
            axes[2].set_title(f"autocorrelogram ±{bins[-1]:g} ms", fontsize=8)
            shown = mine
            if len(shown) > PANEL_MAX_POINTS:
                shown = np.sort(ctx.rng.choice(shown, PANEL_MAX_POINTS, replace=False))
            amplitude = ctx.spikes["amplitude"][shown]
            axes[3].plot(ctx.times_s[shown], amplitude, ".", ms=1.5, color="0.2")
            axes[3].set_title(f"amplitude (µV) over {ctx.duration_s:.0f} s", fontsize=8)
            located = shown[ctx.finite_xy[shown]]
            axes[4].plot(ctx.x[located], ctx.y[located], ".", ms=1.5, color=ctx.unit_colors[unit])
            near = np.linalg.norm(ctx.channel_xy - [row["x_um"], row["y_um"]], axis=1) < 60.0
            axes[4].plot(*ctx.channel_xy[near].T, "s", ms=3, color="0.75", zorder=0)
            axes[4].set_aspect("equal", adjustable="datalim")
            axes[4].set_title(f"location, x {row['x_um']:.0f} y {row['y_um']:.0f} µm", fontsize=8)
            for ax in axes:
                ax.relim()
                ax.autoscale_view()
                ax.set_xticks([])
                if ax is not axes[3]:
                    ax.set_yticks([])
            axes[3].locator_params(axis="y", nbins=3)
            axes[3].tick_params(labelsize=6, length=2, pad=1)
            fig.suptitle(
                f"unit {unit}: {row['quality']} · {int(row['num_spikes']):,} spikes · "
                f"{row['firing_rate_hz']:.1f} Hz · SNR {row['snr']:.1f} · ISI violations "
                f"{row['isi_violations_ratio']:.2f} · presence {row['presence_ratio']:.2f} · "
                f"amplitude cutoff {row['amplitude_cutoff']:.2f}",
                fontsize=9,
            )
            fig.savefig(fig_dir / name, format="png", dpi=DPI, facecolor="white")
            made.append((int(unit), name))
        except Exception as exc:  # a figure must never stop the report
            logger.warning("report: figure %s failed: %s", name, exc, exc_info=True)
            notes.append(f"Figure {name} could not be made ({type(exc).__name__}: {exc}).")
            (fig_dir / name).unlink(missing_ok=True)
        for ax in axes:  # the next unit draws on the same axes
            for artist in [*ax.lines, *ax.collections, *ax.patches]:
                artist.remove()
    fig.clear()
    return made


def _intervals_ms(ctx: _Context, rows: np.ndarray) -> np.ndarray:
    """Inter-spike intervals (ms) of the spikes ``rows`` (time order), within segments."""
    if len(rows) < 2:
        return np.zeros(0)
    gaps = np.diff(ctx.times_s[rows]) * 1000.0
    return gaps[np.diff(ctx.spike_seg[rows]) == 0]


UNIT_TABLE_COLUMNS = {  # units.tsv column -> header in the report
    "unit_id": "unit",
    "quality": "quality",
    "num_spikes": "spikes",
    "firing_rate_hz": "rate (Hz)",
    "snr": "SNR",
    "isi_violations_ratio": "ISI violations",
    "presence_ratio": "presence",
    "amplitude_cutoff": "amplitude cutoff",
    "amplitude_uv": "amplitude (µV)",
    "x_um": "x (µm)",
    "y_um": "y (µm)",
    "z_um": "z (µm)",
}


def _units_html(units, panels: list[tuple[int, str]], constants) -> str:
    """The Units section: the quality summary, the table (sorted by a click on a header) and
    the per-unit panels."""
    e = html.escape
    parts = ['<h2 id="units">Units</h2>']
    if not len(units):
        parts.append('<p id="quality-summary">No units were found.</p>')
        return "\n".join(parts)
    parts.append(
        f'<p id="quality-summary">{len(units)} units: {e(_quality_counts(units))}. Labels '
        "(units.tsv, Phy's cluster_group.tsv): <b>noise</b> below SNR "
        f"{constants.noise_max_snr:g}; <b>mua</b> above {constants.good_max_isi_violations:g} "
        f"ISI violations, below {constants.good_min_presence_ratio:g} presence, above "
        f"{constants.good_max_amplitude_cutoff:g} amplitude cutoff or under "
        f"{constants.good_min_spikes:g} spikes; <b>good</b> otherwise. Click a header to sort."
        "</p>"
    )
    with_panel = {unit for unit, _ in panels}
    header = "".join(f"<th>{e(name)}</th>" for name in UNIT_TABLE_COLUMNS.values())
    rows = []
    for row in units.itertuples(index=False):
        cells = []
        for column in UNIT_TABLE_COLUMNS:
            value = getattr(row, column)
            if column == "unit_id":
                text = str(value)
                text = f'<a href="#unit-{value}">{value}</a>' if value in with_panel else text
                cells.append(f'<td class="num" data-value="{value}">{text}</td>')
            elif column == "quality":
                cells.append(f'<td class="q-{e(str(value))}">{e(str(value))}</td>')
            else:
                shown = "–" if not np.isfinite(value) else _fmt(float(value))
                cells.append(f'<td class="num" data-value="{float(value)}">{e(shown)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(
        f'<table class="sortable" id="units-table"><thead><tr>{header}</tr></thead><tbody>'
        + "\n".join(rows)
        + "</tbody></table>"
    )
    if panels:
        shown = (
            "every unit"
            if len(panels) == len(units)
            else f"{len(panels)} of {len(units)} units (flagged ones with the most spikes, then "
            "good ones by SNR)"
        )
        parts.append(f"<h3>Unit panels</h3><p>{e(shown)}.</p>")
        for unit, name in panels:
            parts.append(
                f'<figure id="unit-{unit}"><img src="figures/{e(name)}" alt="unit {unit}">'
                "<figcaption>Template on the probe (±1 SD), inter-spike intervals, "
                "autocorrelogram, amplitude over time and location (x, registered y) of its "
                "spikes.</figcaption></figure>"
            )
    return "\n".join(parts)


def _constants(params: dict | None):
    """The run's internal constants (``params["constants"]``), the defaults without them."""
    from .constants import Constants

    given = (params or {}).get("constants")
    return Constants.from_dict(given) if given else Constants()


# --------------------------------------------------------------------------------------------
# activity.png
# --------------------------------------------------------------------------------------------


def _figure_drift(path: Path, ctx: _Context, motion) -> bool:
    from matplotlib.colors import LogNorm

    shown = ctx.plot_subset[np.isfinite(ctx.recorded_y[ctx.plot_subset])]
    if not len(shown):
        return False
    # small spikes first, so that the large ones that show the drift are drawn on top
    shown = shown[np.argsort(ctx.abs_amp[shown])]
    panels = [("as recorded", ctx.recorded_y)] + (
        [("motion removed", ctx.y)] if motion is not None else []
    )
    fig = _new_figure(6.0 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    amplitude = np.maximum(ctx.abs_amp[shown], 1e-3)
    norm = LogNorm(vmin=np.percentile(amplitude, 5), vmax=np.percentile(amplitude, 99.5))
    for ax, (title, depth) in zip(axes, panels):
        points = ax.scatter(
            ctx.times_s[shown],
            depth[shown],
            c=amplitude,
            cmap="Greys",
            norm=norm,
            s=1,
            linewidths=0,
            rasterized=True,
        )
        ax.set_title(title)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("depth y (µm)")
    if motion is not None:
        for segment in range(min(motion.num_segments, ctx.num_segments)):
            start = float(ctx.recording.sample_index_to_time(0, segment_index=segment))
            times = np.asarray(motion.temporal_bins_s[segment]) - start
            times = times + ctx.segment_offset_s[segment]
            for column, depth in enumerate(motion.spatial_bins_um):
                axes[0].plot(times, depth + motion.displacement[segment][:, column], "r", lw=1)
    fig.colorbar(points, ax=list(axes), label="|amplitude| (µV)", shrink=0.8)
    _save(fig, path)
    return True


def _time_bin(duration: float, typical_count: float) -> float:
    """A round bin width giving at most 200 bins and, if possible, ~5 spikes of a typical unit
    per bin."""
    n_bins = float(np.clip(typical_count / 5.0, 10, 200)) if typical_count > 0 else 100.0
    for b in (
        0.01,
        0.02,
        0.05,
        0.1,
        0.2,
        0.5,
        1,
        2,
        5,
        10,
        15,
        30,
        60,
        120,
        300,
        600,
        1200,
        1800,
        3600,
    ):
        if duration / b <= n_bins:
            return float(b)
    return float(duration / n_bins)


def _figure_activity(path: Path, ctx: _Context):
    from matplotlib.ticker import MaxNLocator

    duration = max(ctx.duration_s, 1e-9)
    active_counts = ctx.unit_counts[ctx.unit_counts > 0]
    typical = float(np.median(active_counts)) if len(active_counts) else float(len(ctx.spikes))
    bw = _time_bin(duration, typical)
    edges = np.arange(0.0, duration + bw, bw)
    edges = edges[edges < duration - 1e-12]
    edges = np.r_[edges, duration]
    widths = np.diff(edges)

    n_units_active = int(np.sum(ctx.unit_counts > 0))
    heat_h = 2.2 if n_units_active <= 10 else min(2.2 + 0.05 * n_units_active, 7.0)
    fig = _new_figure(12.0, 2.0 + heat_h + 3.0 + 1.2)
    gs = fig.add_gridspec(
        3,
        2,
        height_ratios=[2.0, heat_h, 3.0],
        width_ratios=[1, 0.018],
        hspace=0.35,
        wspace=0.02,
        left=0.07,
        right=0.93,
        top=0.96,
        bottom=0.07,
    )
    ax_rate = fig.add_subplot(gs[0, 0])
    ax_heat = fig.add_subplot(gs[1, 0], sharex=ax_rate)
    ax_amp = fig.add_subplot(gs[2, 0], sharex=ax_rate)

    total, _ = np.histogram(ctx.times_s, bins=edges)
    ax_rate.stairs(total / widths, edges, color="k", lw=1, label="all detected", baseline=None)
    if ctx.assigned.any():
        assigned, _ = np.histogram(ctx.times_s[ctx.assigned], bins=edges)
        ax_rate.stairs(
            assigned / widths,
            edges,
            color="tab:blue",
            lw=1,
            label="assigned to units",
            baseline=None,
        )
    ax_rate.set_ylabel("spikes/s")
    ax_rate.legend(fontsize=8, loc="upper right", frameon=False, ncols=2)
    ax_rate.set_title(f"detection rate ({bw:g} s bins)", fontsize=9)
    ax_rate.set_ylim(0, max(float((total / widths).max(initial=0)), 1e-9) * 1.3)

    order, unit_shank = _heat_map_order(ctx)
    if len(order):
        row_of = np.full(ctx.num_units, -1)
        row_of[order] = np.arange(len(order))
        idx = np.flatnonzero(ctx.assigned)
        rows = row_of[ctx.unit_index[idx]]
        ok = rows >= 0
        h, _, _ = np.histogram2d(
            rows[ok], ctx.times_s[idx][ok], bins=[np.arange(len(order) + 1) - 0.5, edges]
        )
        rates = h / widths[None, :]
        vmax = float(np.percentile(rates[rates > 0], 99)) if np.any(rates > 0) else 1.0
        mesh = ax_heat.pcolormesh(
            edges,
            np.arange(len(order) + 1) - 0.5,
            rates,
            cmap="magma",
            vmin=0,
            vmax=max(vmax, 1e-9),
            shading="flat",
            rasterized=True,
        )
        cax = fig.add_subplot(gs[1, 1])
        fig.colorbar(mesh, cax=cax, label="Hz")
        ax_heat.set_ylim(-0.5, len(order) - 0.5)  # largest y at the top, as on the probe
        if len(order) <= 40:
            ax_heat.set_yticks(np.arange(len(order)))
            ax_heat.set_yticklabels(
                [str(int(u)) for u in order], fontsize=7 if len(order) > 15 else 8
            )
        else:
            from matplotlib.ticker import FuncFormatter

            ax_heat.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
            ax_heat.yaxis.set_major_formatter(
                FuncFormatter(
                    lambda v, _pos: (
                        str(int(order[int(v)])) if 0 <= int(v) < len(order) and v == int(v) else ""
                    )
                )
            )
        for boundary in np.flatnonzero(np.diff(unit_shank[order])):
            ax_heat.axhline(boundary + 0.5, color="w", lw=0.8)  # between two shanks' units
        several = len(np.unique(unit_shank[order])) > 1
        ax_heat.set_ylabel("unit (by shank, then y)" if several else "unit (sorted by y)")
        ax_heat.set_title(f"firing rate of each unit ({len(order)} units with spikes)", fontsize=9)
    else:
        _message_axes(ax_heat, "no units")

    sub = ctx.plot_subset
    sub = sub[np.isfinite(ctx.abs_amp[sub])]
    if len(sub):
        sub = sub[ctx.rng.permutation(len(sub))]
        unassigned = sub[ctx.unit_index[sub] < 0]
        assigned_sub = sub[ctx.unit_index[sub] >= 0]
        dot = 5.0 if len(sub) < 2_000 else 2.0 if len(sub) < 20_000 else 1.0
        if len(unassigned):
            ax_amp.scatter(
                ctx.times_s[unassigned],
                ctx.abs_amp[unassigned],
                s=dot,
                c=[UNASSIGNED_COLOR],
                linewidths=0,
                alpha=0.6,
                rasterized=True,
            )
        if len(assigned_sub):
            ax_amp.scatter(
                ctx.times_s[assigned_sub],
                ctx.abs_amp[assigned_sub],
                s=dot,
                c=ctx.spike_colors(assigned_sub),
                linewidths=0,
                alpha=0.7,
                rasterized=True,
            )
        top = float(np.percentile(ctx.abs_amp[sub], 99.5)) * 1.1
        ax_amp.set_ylim(0, max(top, 1e-6))
        ax_amp.set_title(
            f"|amplitude| of {len(sub):,} spikes (random subset, grey: unassigned)", fontsize=9
        )
    else:
        _message_axes(ax_amp, "no finite amplitudes")
    ax_amp.set_ylabel("|amplitude| (µV)")
    ax_amp.set_xlabel("time (s)" + (", segments concatenated" if ctx.num_segments > 1 else ""))
    for ax in (ax_rate, ax_heat, ax_amp):
        for off in ctx.segment_offset_s[1:]:
            ax.axvline(off, color="tab:green", lw=1, ls="--")
        ax.tick_params(labelsize=8)
    ax_rate.set_xlim(0, duration)
    for ax in (ax_rate, ax_heat):
        ax.tick_params(labelbottom=False)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------------------
# accuracy.png and errors.png
# --------------------------------------------------------------------------------------------


def _accuracy_per_unit(evaluation) -> np.ndarray | None:
    if not isinstance(evaluation, dict):
        return None
    sorting_eval = evaluation.get("sorting")
    if not isinstance(sorting_eval, dict):
        return None
    acc = sorting_eval.get("accuracy_per_unit")
    if acc is None:
        return None
    try:
        acc = np.asarray(acc, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return None
    return acc if len(acc) else None


def _figure_accuracy(path: Path, ctx: _Context, accuracy: np.ndarray, ground_truth):
    acc = np.where(np.isfinite(accuracy), accuracy, 0.0)
    order = np.argsort(-acc, kind="stable")
    n = len(acc)
    fig = _new_figure(min(max(5.0, 0.25 * n + 2), 14.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    colors = np.where(acc[order] >= ACCURACY_THRESHOLD, "tab:green", "tab:orange")
    ax.bar(np.arange(n), acc[order], color=colors, width=0.8 if n < 200 else 1.0)
    ax.axhline(ACCURACY_THRESHOLD, color="k", ls="--", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.6, n - 0.4)
    try:
        gt_ids = list(ground_truth.sorting.unit_ids)
    except Exception:
        gt_ids = []
    if n <= 40 and len(gt_ids) == n:
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels(
            [str(gt_ids[i]) for i in order], fontsize=7, rotation=90 if n > 15 else 0
        )
        ax.set_xlabel("ground-truth unit (sorted by accuracy)")
    else:
        ax.set_xlabel("ground-truth units, sorted by accuracy")
    ax.set_ylabel("accuracy")
    well = int(np.sum(acc >= ACCURACY_THRESHOLD))
    ax.set_title(
        f"{well} of {n} ground-truth units with accuracy ≥ {ACCURACY_THRESHOLD:g}; "
        f"mean {np.mean(acc):.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    return True


def _gt_location_distances(ctx: _Context, ground_truth) -> tuple[np.ndarray, int]:
    """For each ground-truth spike, the distance from its unit's (x, y) to the closest located
    detected spike within the tolerance (spikes with no candidate are left out)."""
    vector = ground_truth.sorting.to_spike_vector()
    locs = np.asarray(ground_truth.unit_locations, dtype=float)[:, :2]
    tol = int(round(GT_TOLERANCE_MS * ctx.fs / 1000))
    spikes = ctx.spikes
    out = []
    for segment in np.unique(vector["segment_index"]):
        gt_idx = np.flatnonzero(vector["segment_index"] == segment)
        det = np.flatnonzero((spikes["segment_index"] == segment) & ctx.finite_xy)
        if len(det) == 0 or len(gt_idx) == 0:
            continue
        det = det[np.argsort(spikes["sample_index"][det], kind="stable")]
        times = spikes["sample_index"][det]
        gt_times = vector["sample_index"][gt_idx]
        lo = np.searchsorted(times, gt_times - tol, side="left")
        hi = np.searchsorted(times, gt_times + tol, side="right")
        target = locs[vector["unit_index"][gt_idx]]
        best = np.full(len(gt_idx), np.inf)
        for k in range(int((hi - lo).max(initial=0))):
            j = lo + k
            ok = j < hi
            cand = det[np.minimum(j, len(det) - 1)]
            d = np.hypot(ctx.x[cand] - target[:, 0], ctx.y[cand] - target[:, 1])
            better = ok & (d < best)
            best[better] = d[better]
        out.append(best[np.isfinite(best)])
    dist = np.concatenate(out) if out else np.zeros(0)
    return dist, len(vector)


def _figure_errors(path: Path, ctx: _Context, ground_truth, evaluation):
    dist, n_gt = _gt_location_distances(ctx, ground_truth)
    if len(dist) == 0:
        return False
    cap = float(min(100.0, max(20.0, 10.0 * math.ceil(1.2 * np.percentile(dist, 99) / 10.0))))
    over = int(np.sum(dist > cap))
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(
        np.minimum(dist, cap),
        bins=np.linspace(0, cap, 51),
        color="tab:blue",
        edgecolor="white",
        lw=0.3,
    )
    med = float(np.median(dist))
    ax.axvline(med, color="k", ls="--", lw=1)
    ax.set_xlim(0, cap)
    ax.set_xlabel(
        "2-D distance to the true unit position (µm)"
        + (f"; the last bin also holds {over:,} spikes > {cap:g} µm" if over else "")
    )
    ax.set_ylabel("ground-truth spikes")
    lines = [
        f"matched {len(dist):,} of {n_gt:,} GT spikes ({100 * len(dist) / max(n_gt, 1):.1f}%)",
        f"median {med:.1f} µm, mean {float(np.mean(dist)):.1f} µm (this figure)",
    ]
    loc = evaluation.get("localization") if isinstance(evaluation, dict) else None
    if isinstance(loc, dict):
        parts = []
        for key, label in (("median_xy_um", "median"), ("mean_xy_um", "mean")):
            v = loc.get(key)
            if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
                parts.append(f"{label} {float(v):.1f} µm")
        if parts:
            lines.append("evaluation: " + ", ".join(parts))
    ax.text(
        0.98,
        0.97,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8.5,
        bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.8"),
    )
    ax.set_title("localization error of detected spikes matched to ground truth", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return f"Median {med:.1f} µm over {len(dist):,} matched spikes."


# --------------------------------------------------------------------------------------------
# html
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; \
max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.meta { color: #777; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff6e0; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; \
margin: 0.4em 0; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir="asc"]::after { content: " ▲"; }
table.sortable th[data-dir="desc"]::after { content: " ▼"; }
td.q-good { color: #1a7f37; } td.q-mua { color: #9a6700; } td.q-noise { color: #cf222e; }
"""
# a click on a header of a sortable table sorts its rows (numbers by data-value, missing last);
# a figure that cannot be loaded (figures/ moved away) says so
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var up = th.dataset.dir !== "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = up ? "asc" : "desc";
      var body = table.tBodies[0];
      var key = function (row) {
        var cell = row.cells[column];
        return cell.dataset.value === undefined ? cell.textContent : parseFloat(cell.dataset.value);
      };
      var missing = function (v) { return typeof v === "number" && isNaN(v); };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (missing(x) || missing(y)) { return missing(x) - missing(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (img) {
    var loaded = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = loaded ? "yes" : "no";
    if (!loaded) {
      var note = document.createElement("p");
      note.className = "note";
      note.textContent = "Figure " + img.getAttribute("src") + " could not be loaded: keep " +
        "the figures folder beside report.html.";
      img.after(note);
    }
  });
  document.body.dataset.ready = "yes";
});
"""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v == round(v) and abs(v) < 1e12:
            return str(int(round(v)))
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.4g}"
        return f"{v:.4g}"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _seconds(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _table(rows, header=None, ids=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r, row in enumerate(rows):
        cells = []
        for c, v in enumerate(row):
            text = v if isinstance(v, str) else _fmt(v)
            cls = ' class="num"' if (c > 0 and _is_number(v)) else ""
            idattr = (
                f' id="{html.escape(ids[r])}"' if (ids and c == len(row) - 1 and ids[r]) else ""
            )
            tag = "th" if (c == 0 and not header) else "td"
            cells.append(f"<{tag}{cls}{idattr}>{html.escape(text)}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _flatten(d, prefix=""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _summarise_list(values) -> str | None:
    try:
        arr = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return None
    if arr.size == 0:
        return "[] (empty)"
    fin = arr[np.isfinite(arr)]
    head = ", ".join(_fmt(v) for v in arr[:16]) + (", …" if arr.size > 16 else "")
    if len(fin) == 0:
        return f"[{head}]"
    return (
        f"n={arr.size}, median {_fmt(float(np.median(fin)))}, min {_fmt(float(fin.min()))}, "
        f"max {_fmt(float(fin.max()))}: [{head}]"
    )


def _value_cell(value):
    if _is_number(value) or value is None or isinstance(value, (bool, np.bool_, str)):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        summary = _summarise_list(value)
        if summary is not None:
            return summary
    return str(value)


def _params_dict(params):
    if params is None:
        return None
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    if hasattr(params, "asdict") and callable(params.asdict):
        return dict(params.asdict())
    if isinstance(params, dict):
        return params
    return {"params": str(params)}


def _summary_rows(ctx: _Context):
    rows, ids = [], []

    def add(label, value, id_=None):
        rows.append((label, value))
        ids.append(id_)

    n = len(ctx.spikes)
    seg_text = ""
    if ctx.num_segments > 1:
        seg_text = " (" + ", ".join(f"{s / ctx.fs:.1f}" for s in ctx.segment_samples) + " s)"
    add("Duration (s)", f"{ctx.duration_s:.2f}" + seg_text, "duration")
    add("Segments", ctx.num_segments, "num-segments")
    add("Channels", ctx.num_channels, "num-channels")
    if ctx.probegroup is not None:
        try:
            probes = ctx.probegroup.probes
            shanks = 0
            for p in probes:
                shanks += len(np.unique(p.shank_ids)) if p.shank_ids is not None else 1
            add("Probes / shanks", f"{len(probes)} / {shanks}", "probes")
        except Exception:
            pass
    add("Sampling rate (Hz)", ctx.fs, "sampling-rate")
    add("Spikes detected", n, "num-spikes")
    add(
        "Detection rate (spikes/s)",
        n / ctx.duration_s if ctx.duration_s > 0 else float("nan"),
        "spike-rate",
    )
    if n:
        n_loc = int(ctx.finite_xy.sum())
        add("Spikes with a finite (x, y)", f"{n_loc} ({100 * n_loc / n:.1f}%)", "num-located")
        n_as = int(ctx.assigned.sum())
        add("Spikes assigned to units", f"{n_as} ({100 * n_as / n:.1f}%)", "num-assigned")
        amp = ctx.abs_amp[np.isfinite(ctx.abs_amp)]
        if len(amp):
            add("Median |amplitude| (µV)", float(np.median(amp)), "median-amplitude")
    add("Units", ctx.num_sorting_units, "num-units")
    if ctx.units is not None:
        add("Units by quality", _quality_counts(ctx.units), "units-by-quality")
    counts = ctx.sorting_spike_counts()
    if len(counts):
        add("Spikes per unit, median", float(np.median(counts)), "spikes-per-unit-median")
        add(
            "Spikes per unit, min – max",
            f"{int(counts.min())} – {int(counts.max())}",
            "spikes-per-unit-range",
        )
    else:
        add("Spikes per unit, median", "–", "spikes-per-unit-median")
    return rows, ids


def _render_html(
    *, title, ctx, timings, evaluation, params, figures, notes, has_ground_truth, panels
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{e(str(title))}</h1>",
        '<p class="meta">locsort report, written '
        f"{e(datetime.datetime.now().isoformat(timespec='seconds'))}"
        + (" · with ground truth" if has_ground_truth else "")
        + "</p>",
    ]
    for note in notes:
        parts.append(f'<p class="note">{e(note)}</p>')

    parts.append("<h2>Summary</h2>")
    rows, ids = _summary_rows(ctx)
    parts.append(_table(rows, ids=ids))

    if timings:
        parts.append("<h2>Timings</h2>")
        numeric = [float(v) for v in timings.values() if _is_number(v) and math.isfinite(float(v))]
        total = sum(numeric)
        rows = []
        for stage, seconds in timings.items():
            if _is_number(seconds):
                share = f"{100 * float(seconds) / total:.1f}%" if total > 0 else "–"
                rows.append((str(stage), _seconds(float(seconds)), share))
            else:
                rows.append((str(stage), _fmt(_value_cell(seconds)), ""))
        rows.append(("total", _seconds(total), "100%" if total > 0 else "–"))
        parts.append(_table(rows, header=("stage", "seconds", "share")))

    if evaluation:
        parts.append("<h2>Evaluation</h2>")
        if isinstance(evaluation, dict):
            loose = []
            for key, value in evaluation.items():
                if isinstance(value, dict):
                    parts.append(f"<h3>{e(str(key))}</h3>")
                    rows = [(name, _value_cell(v)) for name, v in _flatten(value)]
                    parts.append(
                        _table(rows, header=("quantity", "value")) if rows else "<p>(empty)</p>"
                    )
                else:
                    loose.append((str(key), _value_cell(value)))
            if loose:
                parts.append(_table(loose, header=("quantity", "value")))
        else:
            parts.append(f"<p>{e(str(evaluation))}</p>")

    if ctx.units is not None:
        parts.append(_units_html(ctx.units, panels, _constants(params)))

    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append("<p>No figures.</p>")
    for name, caption, alt in figures:
        parts.append(
            f'<figure id="fig-{e(Path(name).stem)}"><img src="figures/{e(name)}" alt="{e(alt)}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )

    pdict = _params_dict(params)
    if pdict:
        parts.append("<h2>Parameters</h2>")
        rows = [(name, _value_cell(v)) for name, v in _flatten(pdict)]
        parts.append(_table(rows, header=("parameter", "value")))

    parts.append(f"<script>{_SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
