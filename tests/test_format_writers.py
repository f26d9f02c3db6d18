"""The format writers produce files that SpikeInterface's own readers load back exactly."""

import numpy as np
import pytest

import spikeinterface.extractors as se

from format_writers import neuropixels1_locations, write_nwb, write_openephys, write_spikeglx

FS = 30000.0


@pytest.fixture(scope="module")
def traces():
    return np.random.default_rng(0).integers(-2000, 2000, size=(int(FS), 32), dtype=np.int16)


def test_spikeglx_roundtrip_with_probe(tmp_path, traces):
    path = write_spikeglx(tmp_path, traces, FS)
    rec = se.read_spikeglx(path, stream_id="imec0.ap")
    assert rec.sampling_frequency == FS
    assert np.array_equal(rec.get_traces(return_in_uV=False), traces)
    assert np.allclose(rec.get_channel_gains(), 0.6 / 512 / 500 * 1e6)
    assert rec.has_probe()
    assert np.array_equal(rec.get_channel_locations(), neuropixels1_locations(32))
    # the sync word is split off into its own stream
    sync = se.read_spikeglx(path, stream_id="imec0.ap-SYNC")
    assert sync.get_num_channels() == 1 and set(np.unique(sync.get_traces())) == {0, 64}


def test_openephys_roundtrip_without_probe(tmp_path, traces):
    path = write_openephys(tmp_path, traces, FS)
    rec = se.read_openephys(path)
    assert rec.stream_name == "Record Node 101#Acquisition_Board-100.Rhythm Data"
    assert rec.sampling_frequency == FS
    assert np.array_equal(rec.get_traces(return_in_uV=False), traces)
    assert np.allclose(rec.get_channel_gains(), 0.195)
    assert not rec.has_probe()


@pytest.mark.parametrize("use_pynwb", [False, True])
def test_nwb_roundtrip_with_locations(tmp_path, traces, use_pynwb):
    locations = neuropixels1_locations(32)
    path = write_nwb(tmp_path / "rec.nwb", traces, FS, locations)
    rec = se.read_nwb_recording(path, use_pynwb=use_pynwb)
    assert rec.sampling_frequency == FS
    assert np.array_equal(rec.get_traces(return_in_uV=False), traces)
    assert np.allclose(rec.get_channel_gains(), 0.195)
    assert rec.has_probe()
    assert np.array_equal(rec.get_channel_locations(), locations)
