"""Labels for the neural sorter from any SpikeInterface sorting (ground truth, Kilosort output,
a curated sorting), matched to locsort's candidate events.

A labelled spike makes the candidate nearest to it in time (within ``tolerance`` samples) a
positive of its unit; candidates no label claims are negatives. With only the first K spikes
of each unit labelled, a unit's labels say nothing after its K-th spike: there, candidates
are *unknown* for that unit (masked out of the loss), not negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass
class Labels:
    """Labelled spikes as global sample positions (segments laid end to end).

    times : (m,) int64, sorted; unit : (m,) unit index 0..U-1 of each
    unit_ids : (U,) the sorting's unit ids
    known_until : (U,) global position up to which a unit's labels are complete
    end : global position where the labelled stretch ends (training reads up to here)
    notes : what the user should know (units dropped or with fewer than K spikes)
    """

    times: np.ndarray
    unit: np.ndarray
    unit_ids: np.ndarray
    known_until: np.ndarray
    end: int
    notes: list[str]

    @property
    def num_units(self) -> int:
        return len(self.unit_ids)


def segment_offsets(recording) -> np.ndarray:
    """Global position of each segment's first sample."""
    lengths = [recording.get_num_samples(s) for s in range(recording.get_num_segments())]
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def labels_from_sorting(sorting, recording, max_spikes_per_unit: int = 0) -> Labels:
    """Check ``sorting`` against ``recording`` and keep (if asked) the first K spikes per unit."""
    fs_rec, fs_lab = recording.get_sampling_frequency(), sorting.get_sampling_frequency()
    if abs(fs_rec - fs_lab) > 1e-6 * fs_rec:
        raise UsageError(
            f"the labels' sampling frequency ({fs_lab:g} Hz) differs from the recording's "
            f"({fs_rec:g} Hz)"
        )
    if sorting.get_num_segments() != recording.get_num_segments():
        raise UsageError(
            f"the labels have {sorting.get_num_segments()} segment(s), "
            f"the recording {recording.get_num_segments()}"
        )
    offsets = segment_offsets(recording)
    times, units, notes, kept_ids = [], [], [], []
    for unit_id in sorting.unit_ids:
        parts = []
        for segment in range(recording.get_num_segments()):
            train = np.asarray(
                sorting.get_unit_spike_train(unit_id, segment_index=segment), dtype=np.int64
            )
            n = recording.get_num_samples(segment)
            if len(train) and (train.min() < 0 or train.max() >= n):
                raise UsageError(
                    f"unit {unit_id} of the labels has spikes outside the recording "
                    f"(segment {segment} has {n} samples): "
                    "the labels belong to another or a longer recording"
                )
            parts.append(np.sort(train) + offsets[segment])
        train = np.concatenate(parts)
        if len(train) == 0:
            notes.append(f"label unit {unit_id} has no spikes and is left out")
            continue
        if max_spikes_per_unit and len(train) < max_spikes_per_unit:
            notes.append(
                f"label unit {unit_id} has only {len(train)} spikes "
                f"(fewer than K = {max_spikes_per_unit}): all are used"
            )
        if max_spikes_per_unit:
            train = train[:max_spikes_per_unit]
        kept_ids.append(unit_id)
        times.append(train)
        units.append(np.full(len(train), len(kept_ids) - 1, np.int64))
    if not kept_ids:
        raise UsageError(
            "the labels sorting has no unit with spikes: nothing to train the neural sorter on"
        )
    total = int(offsets[-1] + recording.get_num_samples(recording.get_num_segments() - 1))
    times_all = np.concatenate(times)
    order = np.argsort(times_all, kind="stable")
    if max_spikes_per_unit:
        # a unit with fewer than K spikes in the whole sorting is complete everywhere
        known = np.array(
            [t[-1] if len(t) >= max_spikes_per_unit else total for t in times], np.int64
        )
        end = int(min(total, max(t[-1] for t in times) + 1))
    else:
        known = np.full(len(kept_ids), total, np.int64)
        end = int(min(total, times_all.max() + 1))
    return Labels(
        times_all[order], np.concatenate(units)[order], np.asarray(kept_ids), known, end, notes
    )


def match(
    labels: Labels, candidate_times: np.ndarray, tolerance: int
) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask), both (n, U), for candidates at global positions ``candidate_times``
    (n,) (any order): each labelled spike marks its nearest candidate within ``tolerance``."""
    n, num_units = len(candidate_times), labels.num_units
    targets = np.zeros((n, num_units), np.float32)
    mask = candidate_times[:, None] <= labels.known_until[None, :] + tolerance
    if n == 0 or len(labels.times) == 0:
        return targets, mask
    order = np.argsort(candidate_times, kind="stable")
    sorted_times = candidate_times[order]
    right = (
        np.clip(np.searchsorted(sorted_times, labels.times), 1, n - 1)
        if n > 1
        else np.zeros(len(labels.times), int)
    )
    left = right - 1 if n > 1 else right
    nearest = np.where(
        np.abs(sorted_times[left] - labels.times) <= np.abs(sorted_times[right] - labels.times),
        left,
        right,
    )
    close = np.abs(sorted_times[nearest] - labels.times) <= tolerance
    targets[order[nearest[close]], labels.unit[close]] = 1.0
    return targets, mask
