"""The fixed-shape neighbourhood follows the probe's own lattice, marks positions past the
edge as virtual, and falls back to nearest contacts on irregular layouts."""

import numpy as np
import probeinterface as pi

from locsort.neighbourhood import (
    AmplitudeReader,
    Neighbourhood,
    fit_amplitude_basis,
    fit_amplitude_denoiser,
    gather_windows,
    peak_amplitudes,
    peak_amplitudes_at,
)
from locsort.simulate import neuropixels_like_probe


def _square(n=10, pitch=15.0):
    return np.stack(np.meshgrid(np.arange(n) * pitch, np.arange(n) * pitch), -1).reshape(-1, 2)


def test_square_grid_gives_a_5x5_box_with_virtual_channels_at_edges():
    nb = Neighbourhood(_square(), size=25)
    assert nb.regular
    assert sorted(map(tuple, nb.offsets[0].astype(int).tolist())) == sorted(
        (dx, dy) for dx in (-30, -15, 0, 15, 30) for dy in (-30, -15, 0, 15, 30)
    )
    counts = nb.real.sum(1).reshape(10, 10)
    assert counts[5, 5] == 25 and counts[0, 0] == 9 and counts[0, 5] == 15
    # every real slot holds the contact that sits at centre + offset
    centre, slot = np.nonzero(nb.real)
    np.testing.assert_allclose(
        nb.positions[nb.index[centre, slot]], nb.positions[centre] + nb.offsets[centre, slot]
    )


def test_staggered_neuropixels_columns_share_one_lattice():
    nb = Neighbourhood(neuropixels_like_probe(64).contact_positions, size=25)
    assert nb.regular
    assert np.all(nb.index[:, 0] == np.arange(64))
    assert nb.real.sum(1).max() <= 16  # 4 columns: many lattice points lie past the edges
    assert (~nb.real).any(axis=1).all()


def test_multi_shank_neighbourhoods_stay_on_their_shank():
    probe = pi.generate_multi_shank(num_shank=2, num_columns=2, num_contact_per_column=8)
    shanks = np.repeat([0, 1], 16)
    nb = Neighbourhood(probe.contact_positions, shanks, size=25)
    assert nb.regular
    # detection's exclusion radius and peeling's footprints: wider than the shank gap here
    within = nb.channels_within(1000.0)
    for c in range(32):
        members = nb.index[c][nb.index[c] >= 0]
        assert np.all(shanks[members] == shanks[c])
        near = within[c][within[c] >= 0]
        assert len(near) == 16 and np.all(shanks[near] == shanks[c])


def test_irregular_layout_falls_back_to_nearest_contacts():
    positions = np.random.default_rng(0).uniform(0, 200, (50, 2))
    nb = Neighbourhood(positions, size=25)
    assert not nb.regular and nb.real.all()
    d = np.linalg.norm(nb.offsets, axis=2)
    assert np.all(np.diff(d, axis=1) >= -1e-6)  # ordered by distance


def test_near_slots_stop_at_the_reach_or_at_two_pitches_on_sparse_probes():
    column = lambda pitch: np.column_stack([np.zeros(32), np.arange(32) * pitch])
    nb = Neighbourhood(column(25.0), size=25)  # the 25 nearest lattice points span +-300 µm
    assert nb.regular and nb.pitch_um == 25.0 and nb.real[16].sum() == 25
    near = nb.near(np.array([16, 0]), 100.0)
    np.testing.assert_array_equal(near.sum(1), [9, 5])  # 4 contacts either side; one side
    assert np.abs(nb.offsets[16][near[0]]).max() == 100.0
    sparse = Neighbourhood(column(150.0), size=25)
    kept = np.abs(sparse.offsets[16][sparse.near(np.array([16]), 100.0)[0]][:, 1])
    assert sorted(kept.tolist()) == [0.0, 150.0, 150.0, 300.0, 300.0]


def test_the_networks_windows_show_no_slot_past_its_reach():
    from types import SimpleNamespace

    from locsort.sort.neural import WINDOW_REACH_UM, Windows

    nb = Neighbourhood(np.column_stack([np.zeros(32), np.arange(32) * 25.0]), size=25)
    batch = SimpleNamespace(centre=np.array([16]), waveforms=np.ones((1, 30, 25), np.float32))
    windows = Windows.from_batch(batch, nb, np.full(32, 2.0, np.float32))
    far = np.linalg.norm(nb.offsets[16], axis=-1) > WINDOW_REACH_UM
    assert far.sum() == 16 and not windows.real[0, far].any() and windows.real[0, ~far].all()
    assert np.all(windows.waveforms[0][:, far] == 0)
    assert np.allclose(windows.waveforms[0][:, ~far], 0.5, atol=1e-2)


def test_gather_windows_reads_zeros_for_virtual_channels():
    traces = np.arange(40, dtype=np.float32).reshape(10, 4)
    out = gather_windows(traces, np.array([5]), np.array([[2, -1]]), before=1, after=2)
    np.testing.assert_array_equal(out[0, :, 0], traces[4:7, 2])
    np.testing.assert_array_equal(out[0, :, 1], 0)


def test_peak_amplitudes_at_equals_the_minimum_of_the_gathered_windows():
    rng = np.random.default_rng(1)
    traces = rng.standard_normal((200, 12)).astype(np.float32)
    rows = rng.integers(6, 194, 30)
    channels = rng.integers(-1, 12, (30, 7))
    expected = peak_amplitudes(gather_windows(traces, rows, channels, before=4, after=5))
    np.testing.assert_array_equal(peak_amplitudes_at(traces, rows, channels, half=4), expected)
    assert np.all(peak_amplitudes_at(traces, rows, channels, half=4)[channels < 0] == 0)


def _two_spike_shapes() -> np.ndarray:
    """(50, 2): a sharp spike with a repolarization bump and a broad one, troughs at sample 20."""
    t = np.arange(-20, 30)
    return np.stack(
        [
            -np.exp(-0.5 * (t / 2.0) ** 2) + 0.3 * np.exp(-0.5 * ((t - 6) / 4.0) ** 2),
            -np.exp(-0.5 * (t / 5.0) ** 2),
        ],
        axis=1,
    )


def test_amplitudes_read_through_the_spike_basis_are_closer_to_the_noise_free_ones():
    # spikes of two shapes (a sharp one and a broad one) at random sizes on 6 channels, in white
    # noise
    rng = np.random.default_rng(0)
    shapes = _two_spike_shapes()
    n, channels = 400, 6
    size = rng.uniform(0, 10, (n, channels))
    kind = rng.integers(0, 2, (n, channels))
    clean = shapes[:, kind].transpose(1, 0, 2) * size[:, None, :]  # (n, T, channels)
    snippets = (clean + rng.standard_normal(clean.shape)).astype(np.float32)
    basis = fit_amplitude_basis(snippets, half=3, before=20, num_components=4)
    assert basis.shape == (50, 4)
    denoised, raw = AmplitudeReader(20, 30, 3, basis), AmplitudeReader(20, 30, 3)
    truth = -clean[:, 17:24].min(axis=1)
    assert (
        np.abs(denoised.of_windows(snippets) - truth).mean()
        < 0.6 * np.abs(raw.of_windows(snippets) - truth).mean()
    )
    # read from traces or from gathered windows: the same (up to float32 rounding: the matrix
    # products differ in shape); virtual channels read 0
    traces = rng.standard_normal((300, 8)).astype(np.float32)
    rows, where = rng.integers(25, 265, 20), rng.integers(-1, 8, (20, 5))
    np.testing.assert_allclose(
        denoised.at(traces, rows, where),
        denoised.of_windows(gather_windows(traces, rows, where, 20, 30)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert np.all(denoised.at(traces, rows, where)[where < 0] == 0)
    np.testing.assert_array_equal(
        raw.at(traces, rows, where), peak_amplitudes_at(traces, rows, where, 3)
    )
    # too few spikes
    assert fit_amplitude_basis(snippets[:10], half=3, before=20, num_components=4) is None


def test_the_spatio_temporal_denoiser_reads_amplitudes_closer_to_the_noise_free_ones():
    # each spike: one of two shapes, on 9 channels in a row with sizes decaying from a random
    # source, in white noise of SD 1: the channels move together, which the denoiser learns from the
    # spikes themselves
    rng = np.random.default_rng(1)
    shapes = _two_spike_shapes()
    n, k = 3000, 9
    source = rng.uniform(-10, 90, n)
    footprint = rng.uniform(4, 20, (n, 1)) * np.exp(
        -np.abs(np.arange(k)[None] * 10.0 - source[:, None]) / 20.0
    )
    clean = shapes[:, rng.integers(0, 2, n)].T[:, :, None] * footprint[:, None, :]  # (n, T, k)
    snippets = (clean + rng.standard_normal(clean.shape)).astype(np.float32)
    basis = fit_amplitude_basis(snippets, half=3, before=20, num_components=4)
    index, centres = np.arange(k)[None], np.zeros(n, np.int64)
    # noise covariance across channels, autocorrelation in time
    white = (np.eye(k), np.eye(1, 51)[0])
    components, gains = fit_amplitude_denoiser(
        snippets, centres, basis, index, *white, min_gain=0.3
    )
    assert (
        components.shape[0] == k * 4
        and 0 < len(gains) < k * 4
        and np.all((gains >= 0.3) & (gains < 1))
    )
    temporal = AmplitudeReader(20, 30, 3, basis)
    spatial = temporal.with_denoiser(components, gains)
    truth = -clean[:, 17:24].min(axis=1)
    error = lambda reader: np.abs(reader.of_windows(snippets) - truth).mean()
    assert error(spatial) < 0.8 * error(temporal)
    # from traces or from gathered windows: the same; virtual slots read 0 and do not reach the
    # real ones
    traces = rng.standard_normal((300, 12)).astype(np.float32)
    rows = rng.integers(25, 265, 20)
    where = np.where(rng.random((20, k)) < 0.2, -1, rng.integers(1, 12, (20, k)))
    read = spatial.at(traces, rows, where)
    np.testing.assert_allclose(
        read, spatial.of_windows(gather_windows(traces, rows, where, 20, 30)), rtol=1e-4, atol=1e-5
    )
    assert np.all(read[where < 0] == 0)
    traces[:, 0] = 1000.0  # what virtual slots gather
    np.testing.assert_allclose(spatial.at(traces, rows, where), read, rtol=1e-5, atol=1e-5)
    assert (
        fit_amplitude_denoiser(snippets[:100], centres[:100], basis, index, *white, min_gain=0.3)
        is None
    )  # too few
    assert (
        fit_amplitude_denoiser(snippets, centres, basis, index, *white, min_gain=1.0) is None
    )  # nothing passes
