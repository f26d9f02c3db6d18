"""The fixed-shape channel neighbourhood of a centre channel, virtual channels past the probe
edge, and amplitude / waveform extraction around spikes.

Every spike is described on the same K positions relative to its centre channel, so that one
encoder serves the whole probe. The K positions are the K nearest points of the probe's own
contact lattice (found from the geometry: a square grid gives a 5 x 5 box for K = 25,
Neuropixels' staggered columns give their centred-rectangular lattice). A position with no
contact (past the probe edge, or across a shank gap) is a *virtual* channel: index -1, zero
signal, masked out of the likelihood, flagged to the encoder. Probes whose contacts do not
form a lattice fall back to the K nearest real contacts of each channel (no virtual ones).

Neighbourhoods never cross shanks. A probe that names no shanks but whose contact columns are
separated by a wide gap (``shank_gap_um``) is split at the gaps: no spike reaches across them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.spatial import cKDTree

_TOLERANCE_UM = 1.0  # contacts closer than this to a lattice position sit on it


def shank_ids(recording, gap_um: float) -> tuple[np.ndarray, str]:
    """(C,) shank of each channel and, when they were inferred, a note saying so.

    SpikeInterface's channel groups (one per shank, or per probe, once a probe is attached) when
    there are several; otherwise the probe is split where its contacts' x positions leave a gap
    wider than ``gap_um`` (a multi-shank probe described without shank ids)."""
    groups = recording.get_channel_groups()
    if groups is not None:
        named = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].astype(int)
        if named.max(initial=0) > 0:
            return named, ""
    x = np.asarray(recording.get_channel_locations(), dtype=float)[:, 0]
    columns = np.unique(x)
    cuts = columns[:-1][np.diff(columns) > gap_um]
    ids = np.searchsorted(cuts, x, side="left").astype(int)
    if not len(cuts):
        return ids, ""
    return ids, (
        f"the probe names no shanks; its contacts were split into {len(cuts) + 1} shanks at the "
        f"gaps of more than {gap_um:g} µm between contact columns"
    )


class Neighbourhood:
    """For each channel, the channel index at each of the K neighbourhood positions (-1: virtual).

    Attributes
    ----------
    index : (C, K) int64, channel at each position, -1 where virtual; column 0 is the channel
        itself.
    offsets : (C, K, 2) float32, position of each neighbourhood slot relative to the centre (µm),
        the same for every channel when ``regular``.
    regular : bool, True when the probe is a lattice (offsets shared by all channels).
    shank_ids : (C,) int, the shank of each channel.
    notes : what the user should know about how the probe was read (``from_recording``).
    """

    def __init__(self, positions: np.ndarray, shank_ids: np.ndarray | None = None, size: int = 25):
        positions = np.asarray(positions, dtype=float)[:, :2]
        num_channels = len(positions)
        shank_ids = np.zeros(num_channels, int) if shank_ids is None else np.asarray(shank_ids)
        self.positions = positions
        self.shank_ids = shank_ids
        self.size = size
        self.notes: list[str] = []
        lattice = self._lattice_offsets(positions, shank_ids, size)
        if lattice is not None:
            self.regular = True
            index = np.full((num_channels, size), -1, dtype=np.int64)
            for shank in np.unique(shank_ids):
                members = np.flatnonzero(shank_ids == shank)
                tree = cKDTree(positions[members])
                targets = positions[members][:, None, :] + lattice[None]
                dist, nearest = tree.query(
                    targets.reshape(-1, 2), distance_upper_bound=_TOLERANCE_UM
                )
                found = np.isfinite(dist)
                slot = np.full(len(dist), -1)
                slot[found] = members[nearest[found]]
                index[members] = slot.reshape(len(members), size)
            self.index = index
            self.offsets = np.broadcast_to(
                lattice.astype(np.float32), (num_channels, size, 2)
            ).copy()
        else:
            self.regular = False
            k = min(size, num_channels)
            index = np.full((num_channels, size), -1, dtype=np.int64)
            for shank in np.unique(shank_ids):
                members = np.flatnonzero(shank_ids == shank)
                kk = min(k, len(members))
                _, nearest = cKDTree(positions[members]).query(positions[members], k=kk)
                index[members, :kk] = members[np.asarray(nearest).reshape(len(members), kk)]
            self.index = index
            offsets = np.where(index[..., None] >= 0, positions[index] - positions[:, None, :], 0.0)
            self.offsets = offsets.astype(np.float32)

    @classmethod
    def from_recording(cls, recording, size: int, shank_gap_um: float) -> "Neighbourhood":
        """With ``notes``: what the user should know about how the probe was read."""
        shanks, note = shank_ids(recording, shank_gap_um)
        neighbourhood = cls(recording.get_channel_locations(), shanks, size)
        neighbourhood.notes = [note] if note else []
        if not neighbourhood.regular and recording.get_num_channels() >= size:
            neighbourhood.notes.append(
                "the contacts form no regular lattice: each channel's neighbourhood is its "
                f"{size} nearest contacts on its shank (no virtual channels past the edges)"
            )
        return neighbourhood

    @property
    def real(self) -> np.ndarray:
        """(C, K) bool: True where the slot holds a real contact."""
        return self.index >= 0

    @cached_property
    def pitch_um(self) -> float:
        """The smallest distance from a channel to a real slot (20 µm when there is none)."""
        nonzero = np.linalg.norm(self.offsets[self.real], axis=-1)
        nonzero = nonzero[nonzero > 0]
        return float(nonzero.min()) if len(nonzero) else 20.0

    def near(self, centres: np.ndarray, reach_um: float) -> np.ndarray:
        """(n, K) bool: real slots of ``centres``' neighbourhoods within ``reach_um`` of the
        centre, or two pitches on probes sparser than that."""
        distance = np.linalg.norm(self.offsets[centres], axis=-1)
        reach = max(reach_um, 2 * self.pitch_um) + _TOLERANCE_UM
        return (self.index[centres] >= 0) & (distance <= reach)

    @staticmethod
    def _lattice_offsets(positions, shank_ids, size):
        """The ``size`` nearest lattice offsets (including 0) if the contacts form a lattice."""
        offsets = []
        for shank in np.unique(shank_ids):
            pos = positions[shank_ids == shank]
            if len(pos) < 2:
                continue
            tree = cKDTree(pos)
            pairs = tree.query_pairs(r=np.inf if len(pos) < 64 else 400.0, output_type="ndarray")
            d = pos[pairs[:, 1]] - pos[pairs[:, 0]]
            offsets.append(np.concatenate([d, -d]))
        if not offsets:
            return None
        unique = np.unique(np.round(np.concatenate(offsets) * 2) / 2, axis=0)
        norms = np.linalg.norm(unique, axis=1)
        angles = np.arctan2(unique[:, 1], unique[:, 0])
        order = np.lexsort((angles, np.round(norms, 3)))
        candidates = np.vstack([[0.0, 0.0], unique[order][: size - 1]])
        if len(candidates) < size:
            return None
        # a lattice is closed under addition: sums of small offsets are offsets too
        small = candidates[1:9]
        sums = (small[:, None, :] + small[None, :, :]).reshape(-1, 2)
        sums = sums[np.linalg.norm(sums, axis=1) > _TOLERANCE_UM]
        # sums beyond the probe's extent (e.g. 2 column pitches on a 2-column shank) cannot exist
        span = np.abs(unique).max(axis=0) + _TOLERANCE_UM
        within = sums[
            (np.linalg.norm(sums, axis=1) <= norms.max()) & np.all(np.abs(sums) <= span, axis=1)
        ]
        if len(within) == 0:
            return None
        hit, _ = cKDTree(unique).query(within, distance_upper_bound=_TOLERANCE_UM)
        if np.mean(np.isfinite(hit)) < 0.95:
            return None
        return candidates

    def channels_within(self, radius_um: float, max_count: int | None = None) -> np.ndarray:
        """(C, M) channel indices (same shank, distance <= radius), padded with -1; with
        ``max_count``, the nearest ``max_count`` of them, nearest first."""
        tree = cKDTree(self.positions)
        lists = tree.query_ball_point(self.positions, r=radius_um + 1e-6)
        lists = [
            [j for j in sorted(lst) if self.shank_ids[j] == self.shank_ids[i]]
            for i, lst in enumerate(lists)
        ]
        if max_count is not None:
            for i, lst in enumerate(lists):
                distance = np.linalg.norm(self.positions[lst] - self.positions[i], axis=1)
                lists[i] = [lst[k] for k in np.argsort(distance, kind="stable")[:max_count]]
        width = max(len(lst) for lst in lists)
        out = np.full((len(lists), width), -1, dtype=np.int64)
        for i, lst in enumerate(lists):
            out[i, : len(lst)] = lst
        return out


def gather_windows(
    traces: np.ndarray, rows: np.ndarray, channels: np.ndarray, before: int, after: int
) -> np.ndarray:
    """(n, before+after, M) windows of ``traces`` (T, C) around ``rows`` on ``channels`` (n, M).

    Channel -1 (virtual) reads zeros. Rows must leave ``before``/``after`` samples inside
    ``traces`` (the chunk margin guarantees it).
    """
    windows = np.ascontiguousarray(
        _channel_snippets(traces, rows, channels, before, after).transpose(0, 2, 1)
    )
    virtual = channels < 0
    if virtual.any():
        np.putmask(windows, np.broadcast_to(virtual[:, None, :], windows.shape), 0.0)
    return windows


def _channel_snippets(traces, rows, channels, before, after) -> np.ndarray:
    """(n, M, before+after) snippets, channel-major, read from a strided view of every window of
    ``traces`` (no (n, M, T) index array, so faster than indexing time and channel); virtual
    slots (-1) read channel 0."""
    if len(rows) == 0:  # traces may then be shorter than a window
        return np.zeros((0, channels.shape[1], before + after), traces.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(
        traces, before + after, axis=0
    )  # (T - span + 1, C, span)
    return windows[(rows - before)[:, None], np.where(channels < 0, 0, channels)]


def peak_amplitudes(windows: np.ndarray) -> np.ndarray:
    """Negative-peak size on each channel (positive µV): minus the minimum over the window."""
    return -windows.min(axis=1)


def peak_amplitudes_at(
    traces: np.ndarray, rows: np.ndarray, channels: np.ndarray, half: int
) -> np.ndarray:
    """``peak_amplitudes`` of the windows ``rows`` +- ``half`` on ``channels`` (n, M), without
    building them: a running minimum over the window's 2 half + 1 time offsets, each one
    gather of (n, M) samples (much faster than the (n, 2 half + 1, M) fancy index).
    Virtual channels (-1) read 0."""
    virtual = channels < 0
    num_channels = traces.shape[1]
    flat = traces.reshape(-1)
    index = rows[:, None] * num_channels + np.where(virtual, 0, channels)
    lowest = flat[index - half * num_channels]
    for offset in range(-half + 1, half + 1):
        np.minimum(lowest, flat[index + offset * num_channels], out=lowest)
    lowest[virtual] = 0.0
    return -lowest


@dataclass(frozen=True)
class AmplitudeReader:
    """Each spike's negative-peak size (positive µV) per channel: minus the minimum within
    +/- ``half`` samples of the spike's time.

    With ``basis`` (T, P), the recording's temporal principal components of spike snippets
    (``fit_amplitude_basis``), each channel's snippet (``before`` + ``after`` samples) is first
    projected on them. The minimum of the raw trace picks up noise, most of all on the small far
    channels whose decay places the source; the projection keeps each channel's own spike shape
    and drops most of the noise.

    With ``components`` (K P, r) and ``gains`` (r,) as well (``fit_amplitude_denoiser``), the
    whole neighbourhood's temporal coefficients (K channels x P) are then replaced by their
    linear least-squares (Wiener) estimate from the recording's spikes: a spike's channels move
    together, so what is shared across channels is kept and what is not (noise) shrinks."""

    before: int
    after: int
    half: int
    basis: np.ndarray | None = None
    components: np.ndarray | None = None
    gains: np.ndarray | None = None

    @property
    def description(self) -> str:
        """In words, for run.json."""
        where = f"minimum within +/- {self.half} samples of the spike"
        if self.basis is None:
            return where + " on the traces"
        where += (
            f" on each snippet projected on {self.basis.shape[1]} temporal principal components "
            "of the recording's spikes"
        )
        if self.components is None:
            return where
        return where + (
            f", the neighbourhood's coefficients denoised on {self.components.shape[1]} "
            "spatio-temporal components of the recording's spikes (Wiener gains)"
        )

    def with_denoiser(self, components: np.ndarray, gains: np.ndarray) -> "AmplitudeReader":
        return AmplitudeReader(
            self.before,
            self.after,
            self.half,
            self.basis,
            components.astype(np.float32),
            gains.astype(np.float32),
        )

    @cached_property
    def _filters(self) -> np.ndarray:
        """(T, 2 half + 1): a snippet times this is its projection on the basis, read at the
        samples near the spike (one matrix product for projection and reconstruction)."""
        return np.ascontiguousarray(self.basis @ self._near.T)

    @cached_property
    def _near(self) -> np.ndarray:
        """(2 half + 1, P): the basis at the samples near the spike."""
        return np.ascontiguousarray(
            self.basis[self.before - self.half : self.before + self.half + 1]
        )

    def _denoised(self, coefficients: np.ndarray) -> np.ndarray:
        """(n, K, 2 half + 1) near the spike, from (n, K, P) temporal coefficients (virtual
        slots 0)."""
        n, k, p = coefficients.shape
        flat = coefficients.reshape(n, k * p)
        flat = ((flat @ self.components) * self.gains) @ self.components.T
        return flat.reshape(n, k, p) @ self._near.T

    def of_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, M) from (n, before + after, M) snippets."""
        if self.basis is None:
            return peak_amplitudes(
                windows[:, self.before - self.half : self.before + self.half + 1]
            )
        if self.components is None:
            return -np.matmul(self._filters.T, windows).min(axis=1)
        coefficients = np.matmul(
            windows.transpose(0, 2, 1).astype(np.float32, copy=False), self.basis
        )
        amplitudes = -self._denoised(coefficients).min(axis=2)
        # virtual slots (zero windows): as ``at`` reads them
        amplitudes[~windows.any(axis=1)] = 0.0
        return amplitudes

    def at(self, traces: np.ndarray, rows: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """(n, M) for the spikes at ``rows`` of ``traces`` on ``channels`` (n, M; -1 virtual: 0)."""
        if self.basis is None:
            return peak_amplitudes_at(traces, rows, channels, self.half)
        # snippets gathered channel-major, (n * M, T), so that the projection is one matrix product
        span = self.before + self.after
        snippets = _channel_snippets(traces, rows, channels, self.before, self.after).reshape(
            -1, span
        )
        if self.components is None:
            # made (2 half + 1, n * M) so that the minimum runs across rows: a minimum along each
            # row of 2 half + 1 values cost more than the product itself
            amplitudes = -(self._filters.T @ snippets.T).min(axis=0).reshape(channels.shape)
        else:
            coefficients = (snippets @ self.basis).reshape(*channels.shape, -1)
            coefficients[channels < 0] = (
                0.0  # virtual slots read channel 0: they must not reach the others
            )
            amplitudes = -self._denoised(coefficients).min(axis=2)
        amplitudes[channels < 0] = 0.0
        return amplitudes


def fit_amplitude_basis(
    snippets: np.ndarray, half: int, before: int, num_components: int, channels_per_spike: int = 5
) -> np.ndarray | None:
    """(T, P) temporal principal components of (n, T, K) µV spike snippets on their
    neighbourhoods, from each spike's ``channels_per_spike`` largest channels (where its shape
    is above the noise), not centred: a zero snippet stays zero. None with fewer than 50 spikes."""
    if num_components <= 0 or len(snippets) < 50:
        return None
    size = -snippets[:, before - half : before + half + 1].min(axis=1)  # (n, K)
    largest = np.argsort(-size, axis=1)[:, :channels_per_spike]
    shapes = (
        np.take_along_axis(snippets, largest[:, None, :], axis=2)
        .transpose(0, 2, 1)
        .reshape(-1, snippets.shape[1])
    )
    _, _, vt = np.linalg.svd(shapes.astype(np.float64), full_matrices=False)
    return vt[:num_components].T.astype(np.float32)


def fit_amplitude_denoiser(
    windows: np.ndarray,
    centres: np.ndarray,
    basis: np.ndarray,
    index: np.ndarray,
    noise_covariance: np.ndarray,
    noise_autocorrelation: np.ndarray,
    min_gain: float,
    max_spikes: int = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Spatio-temporal denoiser of channel amplitudes: (components (K P, r), gains (r,)) for
    ``AmplitudeReader``, or None (too few spikes, or nothing passes ``min_gain``).

    The spikes' (n, T, K) neighbourhood snippets (``windows``, virtual slots 0, around the
    channels ``centres``) become (n, K P) temporal coefficients on ``basis``; their second
    moment's eigenvectors are the components. Along each, the noise's share of that second
    moment comes from the noise model (``noise_covariance`` (C, C) across channels, averaged
    over the spikes' neighbourhoods ``index[centres]``, times ``noise_autocorrelation`` in time),
    and the component is kept with its Wiener gain 1 - noise / total when that is at least
    ``min_gain``: signal-dominated directions pass almost whole, noise-dominated ones shrink
    or go (and the fewer kept, the faster reading is). Uncentred, so zero stays zero."""
    n, t, k = windows.shape
    p = basis.shape[1]
    if n < 4 * k * p:  # a (K P)-dimensional second moment needs several spikes per dimension
        return None
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:max_spikes])
    # float64 products in blocks of 1,000 spikes: a float64 copy of all 20,000 snippets would
    # take ~200 MB
    coefficients = np.concatenate(
        [
            (windows[block].astype(np.float64).transpose(0, 2, 1) @ basis).reshape(
                len(block), k * p
            )
            for block in np.array_split(pick, -(-len(pick) // 1000))
        ]
    )
    total, vectors = np.linalg.eigh(coefficients.T @ coefficients / len(pick))
    total, vectors = total[::-1], vectors[:, ::-1]
    # the noise model in the coefficients: channels (K, K) averaged over the spikes'
    # neighbourhoods, time (P, P)
    used, counts = np.unique(centres[pick], return_counts=True)
    slots = index[used]
    real = slots >= 0
    safe = np.where(real, slots, 0)
    per_centre = np.where(
        real[:, :, None] & real[:, None, :],
        noise_covariance[safe[:, :, None], safe[:, None, :]],
        0.0,
    )
    spatial = np.einsum("u,ukl->kl", counts / counts.sum(), per_centre)
    lags = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :])
    temporal = basis.T @ noise_autocorrelation[lags] @ basis
    shaped = vectors.T.reshape(-1, k, p)
    noise = np.einsum("ikp,kl,ilq,pq->i", shaped, spatial, shaped, temporal, optimize=True)
    gains = 1.0 - noise / np.maximum(total, 1e-12)
    keep = gains >= min_gain
    if not keep.any():
        return None
    return vectors[:, keep], gains[keep]
