"""Probes unlike the ones locsort was tuned on: each is read as it is, and the run says how.
(Multi-shank probes: test_distributed runs every long-run test on two shanks.)"""

import numpy as np
import probeinterface as pi
import pytest

import locsort
from locsort.evaluate import sorting_accuracy
from locsort.neighbourhood import shank_ids
from locsort.simulate import generate_recording, neuropixels2_like_probe


def _probe(positions):
    probe = pi.Probe(ndim=2)
    probe.set_contacts(np.asarray(positions, float), shapes="circle", shape_params={"radius": 6})
    probe.set_device_channel_indices(np.arange(len(positions)))
    return probe


PROBES = {
    "one channel": lambda: _probe([[0.0, 0.0]]),
    "tetrode": lambda: _probe(pi.generate_tetrode().contact_positions),
    "irregular": lambda: _probe(np.random.default_rng(0).uniform((0, 0), (60, 300), (32, 2))),
}
NOTES = {
    "one channel": ("no common reference", "only 1 channel per shank", "centre of mass"),
    "tetrode": ("no common reference", "only 4 channels per shank", "centre of mass"),
    "irregular": ("no regular lattice", "nearest contacts"),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_a_probe_with_no_lattice_sorts_and_says_how_it_was_read(name, tmp_path):
    probe = PROBES[name]()
    recording, truth = generate_recording(duration=10.0, num_units=4, seed=2, probe=probe)
    result = locsort.run(recording, tmp_path / "out", progress=False)
    for phrase in NOTES[name]:
        assert phrase in result.note
    assert np.isfinite(result.spikes["x"]).all() and np.isfinite(result.spikes["y"]).all()
    # every spike is placed within the probe's reach
    reach = np.abs(result.spikes["x"] - probe.contact_positions[:, 0].mean())
    assert reach.max() < 200
    assert sorting_accuracy(result.sorting, truth)["well_detected"] >= 2


def test_shanks_are_named_or_inferred_from_the_gaps_between_contact_columns():
    probe = neuropixels2_like_probe(32, num_shanks=2)
    recording, _ = generate_recording(duration=1.0, num_units=2, seed=0, probe=probe)
    named, note = shank_ids(recording, gap_um=100.0)
    assert note == "" and np.array_equal(named, np.repeat([0, 1], 16))
    recording.set_probe(_probe(probe.contact_positions))  # in place
    inferred, note = shank_ids(recording, gap_um=100.0)
    assert np.array_equal(inferred, named) and "split into 2 shanks" in note
    # two columns closer than the gap: one shank, nothing to say
    single, _ = generate_recording(
        duration=1.0, num_units=2, seed=0, probe=_probe(probe.contact_positions[:16])
    )
    ids, note = shank_ids(single, gap_um=100.0)
    assert note == "" and np.all(ids == 0)
