"""Amortized Bayesian localization: trained on the recording's own spikes (short runs here),
better than centre of mass, not pulled inward at the probe edge, saveable, with a NUTS
reference and SpikeInterface plug-ins."""

import numpy as np
import pytest

import locsort
from locsort.errors import LocsortError, UsageError
from locsort.evaluate import ground_truth_peaks, localization_errors
from locsort.localize.amortized import AmortizedLocalizer
from locsort.params import Params, params_with
from locsort.pipeline import locate
from locsort.prepare import prepare
from locsort.preprocess import preprocess

QUICK = dict(
    encoder_max_epochs=25, encoder_patience=4, encoder_init=None
)  # from scratch: the recording's spikes alone


@pytest.fixture(scope="module")
def processed(ground_truth_recording):
    recording, truth = ground_truth_recording
    processed = preprocess(recording)
    peaks, true_xyz = ground_truth_peaks(processed, truth)
    return processed, peaks, true_xyz


@pytest.fixture(scope="module")
def trained(processed):
    recording, peaks, true_xyz = processed
    prep = prepare(recording, params_with(preprocess=False, **QUICK))
    spikes, localizer = locate(prep, peaks, progress=False)
    com = locsort.localize(
        recording,
        peaks=peaks,
        method="center_of_mass",
        params=params_with(preprocess=False),
        progress=False,
    )
    return prep, spikes, localizer, com


def test_amortized_posterior_is_more_accurate_than_centre_of_mass(processed, trained):
    _, _, true_xyz = processed
    _, spikes, localizer, com = trained
    assert localizer.fallback is None and localizer.history["epochs"] >= 2
    ours = localization_errors(spikes, true_xyz)["median_xy_um"]
    baseline = localization_errors(com, true_xyz)["median_xy_um"]
    assert ours < 0.8 * baseline, (ours, baseline)


def test_posterior_fields_are_complete_and_z_is_positive(trained):
    _, spikes, _, _ = trained
    for name in ("x", "y", "z", "alpha", "x_std", "y_std", "z_std"):
        assert np.all(np.isfinite(spikes[name])), name
    assert np.all(spikes["z"] > 0)
    assert np.all(spikes["x_std"] > 0) and np.all(spikes["z_std"] > 0)


def test_edge_spikes_are_not_pulled_inward_like_centre_of_mass(processed, trained):
    recording, _, true_xyz = processed
    _, spikes, _, com = trained
    x_min, x_max = (
        recording.get_channel_locations()[:, 0].min(),
        recording.get_channel_locations()[:, 0].max(),
    )
    outside = (true_xyz[:, 0] < x_min - 3) | (true_xyz[:, 0] > x_max + 3)
    assert outside.sum() > 50, "the test recording needs units beyond the probe edge"
    ours = np.abs(spikes["x"][outside] - true_xyz[outside, 0]).mean()
    theirs = np.abs(com["x"][outside] - true_xyz[outside, 0]).mean()
    assert ours < 0.7 * theirs, (ours, theirs)
    # centre of mass can never leave the contacts' hull; the posterior does
    assert np.mean((spikes["x"][outside] < x_min) | (spikes["x"][outside] > x_max)) > 0.3


def test_amplitude_jitter_gives_several_centres_and_one_pooled_posterior_per_spike(
    processed, trained
):
    recording, peaks, true_xyz = processed
    com = trained[3]
    prep = prepare(recording, params_with(preprocess=False, jitter_uv=10.0, encoder_max_epochs=3))
    spikes, localizer = locate(prep, peaks, progress=False)
    scanner = prep.scanner(peaks)
    observations = localizer.observe(
        scanner.batch(scanner.chunks()[0], waveforms=False), prep.neighbourhood
    )
    used = (observations["centres"] >= 0).sum(axis=1)
    assert used.min() >= 1 and used.max() > 1, (
        "no spike had a second channel within 10 µV of its largest"
    )
    assert (
        len(spikes) == len(peaks)
        and np.all(np.isfinite(spikes["x"]))
        and np.all(spikes["x_std"] > 0)
    )
    # pooling the centres (mean of means in probe coordinates) must still beat centre of mass
    assert (
        localization_errors(spikes, true_xyz)["median_xy_um"]
        < localization_errors(com, true_xyz)["median_xy_um"]
    )


def test_saved_encoder_reproduces_and_checks_geometry(tmp_path, processed, trained):
    recording, peaks, _ = processed
    _, spikes, localizer, _ = trained
    path = tmp_path / "encoder.safetensors"
    localizer.save(path)
    again = locsort.localize(
        recording,
        peaks=peaks,
        params=params_with(preprocess=False, encoder_path=str(path)),
        progress=False,
    )
    np.testing.assert_allclose(again["x"], spikes["x"], atol=1e-3)
    np.testing.assert_allclose(again["y_std"], spikes["y_std"], atol=1e-3)

    from spikeinterface.core import generate_ground_truth_recording

    square, _ = generate_ground_truth_recording(
        durations=[3.0],
        num_channels=16,
        num_units=3,
        seed=0,
        generate_probe_kwargs=dict(num_columns=4, xpitch=20, ypitch=20),
    )
    with pytest.raises(UsageError, match="another probe geometry"):
        locsort.localize(square, params=params_with(encoder_path=str(path)), progress=False)


def test_corrupt_or_foreign_encoder_files_are_refused(tmp_path, ground_truth_recording):
    recording, _ = ground_truth_recording
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64 + b"not a model")
    with pytest.raises(LocsortError, match="corrupt"):
        AmortizedLocalizer.load(corrupt)
    from safetensors.torch import save_file
    import torch

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(LocsortError, match="not a locsort encoder"):
        AmortizedLocalizer.load(foreign)
    with pytest.raises(UsageError, match="not found"):
        AmortizedLocalizer.load(tmp_path / "missing.safetensors")


def test_training_starts_from_the_shipped_encoder_of_the_probe_type_and_adapts_it(
    processed, trained
):
    from locsort.localize.pretrained import ENCODER_PATHS

    recording, peaks, true_xyz = processed
    com = trained[3]
    prep = prepare(
        recording, params_with(preprocess=False)
    )  # default: encoder_init=pretrained, encoder_init_epochs
    spikes, localizer = locate(prep, peaks, progress=False)
    assert localizer.history["started_from"] == "neuropixels1"  # the test probe is Neuropixels-like
    assert 1 <= localizer.history["epochs"] <= Params().constants.encoder_init_epochs
    shipped = AmortizedLocalizer.load(ENCODER_PATHS["neuropixels1"])
    assert shipped.info["made_by"] == "scripts/pretrain_encoder.py" and shipped.info["recordings"]
    # trained on: the weights moved away from the shipped ones
    first = next(iter(shipped.net.state_dict()))
    assert not np.allclose(
        localizer.net.state_dict()[first].numpy(), shipped.net.state_dict()[first].numpy()
    )
    ours = localization_errors(spikes, true_xyz)["median_xy_um"]
    assert ours < 0.8 * localization_errors(com, true_xyz)["median_xy_um"]
    assert (
        ours < localization_errors(trained[1], true_xyz)["median_xy_um"] + 2.0
    )  # about as good as from scratch


def test_an_encoder_to_start_from_must_fit_the_probe_and_other_probes_train_from_scratch(
    tmp_path, processed, trained
):
    from spikeinterface.core import generate_ground_truth_recording

    recording, peaks, _ = processed
    path = tmp_path / "encoder.safetensors"
    trained[2].save(path)
    prep = prepare(
        recording, params_with(preprocess=False, encoder_init=str(path), encoder_init_epochs=2)
    )
    _, localizer = locate(prep, peaks, progress=False)
    assert localizer.history["started_from"] == str(path) and localizer.history["epochs"] <= 2

    square, _ = generate_ground_truth_recording(
        durations=[10.0],
        num_channels=16,
        num_units=5,
        seed=0,
        generate_probe_kwargs=dict(num_columns=4, xpitch=20, ypitch=20),
    )
    with pytest.raises(UsageError, match="another probe geometry"):
        locsort.localize(square, params=params_with(encoder_init=str(path)), progress=False)
    # no shipped encoder has a 20 µm square lattice: trained from scratch, up to encoder_max_epochs
    prep = prepare(square, params_with(encoder_max_epochs=3, min_training_spikes=50))
    _, localizer = locate(prep, None, progress=False)
    assert localizer.history["started_from"] == "scratch" and localizer.history["epochs"] == 3
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(LocsortError, match="corrupt"):
        locsort.localize(
            recording,
            peaks=peaks,
            params=params_with(preprocess=False, encoder_init=str(corrupt)),
            progress=False,
        )


def test_unknown_localizer_settings_are_refused():
    from locsort.localize import make_localizer

    with pytest.raises(UsageError, match="decay_law"):
        make_localizer("locsort", params_with(decay_law="gaussian"))
    with pytest.raises(UsageError, match="localization method"):
        make_localizer("kalman", Params())
    with pytest.raises(UsageError, match="encoder_init_epochs"):
        make_localizer("locsort", params_with(encoder_init_epochs=0))


def test_too_few_spikes_falls_back_to_centre_of_mass_and_says_so(processed):
    recording, peaks, _ = processed
    prep = prepare(recording, params_with(preprocess=False, min_training_spikes=10**6))
    spikes, localizer = locate(prep, peaks[:200], progress=False)
    assert "centre of mass" in localizer.fallback_reason
    assert np.all(np.isnan(spikes["x_std"])) and np.all(np.isfinite(spikes["x"]))


def test_nuts_reference_agrees_with_the_amortized_posterior(trained, processed):
    from locsort.localize.mcmc import nuts_localize
    from locsort.scan import scan

    recording, peaks, true_xyz = processed
    prep, spikes, localizer, _ = trained
    subset = np.arange(0, len(peaks), len(peaks) // 4)[:4]
    obs = scan(
        prep.recording,
        lambda b: {**localizer.observe(b, prep.neighbourhood), "order": b.order},
        params=prep.params,
        neighbourhood=prep.neighbourhood,
        noise=prep.noise,
        peaks=peaks[subset],
        amplitudes=prep.amplitudes,
        progress=False,
    )
    obs.pop("order")
    nuts = nuts_localize(
        obs["centres"][:, 0],
        obs["amplitudes"][:, 0],
        prep.neighbourhood,
        prep.noise,
        localizer.globals,
        num_samples=60,
        warmup_steps=60,
    )
    assert np.all(nuts["z"] > 0) and np.all(np.isfinite(nuts["x"])) and np.all(nuts["x_std"] > 0)
    # the amortized mean lies within the exact posterior (in units of its SD)
    gap = np.hypot(nuts["x"] - spikes["x"][subset], nuts["y"] - spikes["y"][subset])
    spread = np.hypot(nuts["x_std"], nuts["y_std"])
    assert np.median(gap / spread) < 2.0, (gap, spread)


def test_spikeinterface_localize_peaks_plugin(processed):
    from spikeinterface.sortingcomponents.peak_localization import localize_peaks

    recording, peaks, true_xyz = processed
    locations = localize_peaks(
        recording,
        peaks,
        method="locsort",
        method_kwargs=dict(encoder_max_epochs=3),
        job_kwargs=dict(n_jobs=1, progress_bar=False),
    )
    assert len(locations) == len(peaks)
    assert {"x", "y", "z", "alpha", "x_std", "y_std", "z_std"} <= set(locations.dtype.names)
    assert (
        np.median(np.hypot(locations["x"] - true_xyz[:, 0], locations["y"] - true_xyz[:, 1])) < 30
    )


def test_spikeinterface_spike_locations_extension(ground_truth_recording):
    from spikeinterface.core import create_sorting_analyzer

    recording, truth = ground_truth_recording
    analyzer = create_sorting_analyzer(
        truth.sorting, preprocess(recording), sparse=False, format="memory"
    )
    analyzer.compute(["random_spikes", "templates"], n_jobs=1, progress_bar=False)
    analyzer.compute(
        "spike_locations",
        method="locsort",
        method_kwargs=dict(encoder_max_epochs=2),
        n_jobs=1,
        progress_bar=False,
    )
    locations = analyzer.get_extension("spike_locations").get_data()
    assert len(locations) == truth.sorting.to_spike_vector().size
    assert np.all(np.isfinite(locations["x"]))


def test_the_amplitude_noise_scale_is_what_the_data_say_and_is_fitted(trained):
    """Amplitudes drawn from the model with readings half as noisy as the traces (as denoised
    readings are) are most likely under noise_scale 0.5; the encoder fits it (from 1)."""
    import pyro
    import torch

    from locsort.localize.model import ModelGlobals, amplitudes_given, model
    from locsort.neighbourhood import Neighbourhood

    grid = np.stack(np.meshgrid(np.arange(10) * 15.0, np.arange(10) * 15.0), -1).reshape(-1, 2)
    neighbourhood = Neighbourhood(grid)
    centres = np.random.default_rng(0).integers(0, len(grid), 2000)
    real = torch.as_tensor(neighbourhood.real[centres])
    slot_xy = torch.as_tensor(neighbourhood.offsets[centres])
    sigma = torch.full(real.shape, 10.0)
    truth = ModelGlobals(noise_scale=0.5)
    pyro.set_rng_seed(0)
    # the observed site sampled instead: amplitudes drawn from the model
    trace = pyro.poutine.trace(pyro.poutine.uncondition(model)).get_trace(
        torch.zeros(real.shape), real, slot_xy, sigma, truth
    )
    latent = {
        name: trace.nodes[name]["value"] for name in ("x", "y", "z", "log_alpha", "log_length")
    }
    log_likelihood = {
        scale: float(
            amplitudes_given(latent, slot_xy, sigma, ModelGlobals(noise_scale=scale))
            .log_prob(trace.nodes["amplitudes"]["value"])[real]
            .sum()
        )
        for scale in (0.25, 0.5, 1.0, 2.0)
    }
    assert max(log_likelihood, key=log_likelihood.get) == 0.5, log_likelihood

    _, _, localizer, _ = trained
    assert (
        abs(localizer.globals.noise_scale - 1.0) > 0.01
        and localizer.history["globals"]["noise_scale"] == localizer.globals.noise_scale
    )


def test_the_encoders_elbo_is_pyros_trace_elbo_of_the_model():
    """The closed-form ELBO that trains the encoder and Pyro's Monte Carlo ELBO of the Pyro
    model agree in expectation (2,000 draws each) for a posterior that is not the prior; an
    ELBO that dropped or doubled one latent's KL term (~1 nat per spike) would differ by
    ~10 standard errors."""
    import pyro
    import torch
    from pyro.infer import Trace_ELBO

    from locsort.localize.model import ModelGlobals, elbo, mean_field, model

    torch.manual_seed(0)
    n, k, draws = 64, 9, 2000
    g = ModelGlobals()
    amplitudes, real = torch.rand(n, k) * 80, torch.rand(n, k) > 0.2
    slot_xy, sigma = torch.randn(n, k, 2) * 20, torch.full((n, k), 6.0)
    loc = torch.stack(
        [
            torch.randn(n) * 5,
            torch.randn(n) * 5,
            torch.full((n,), 3.3),
            torch.full((n,), 5.0),
            torch.full((n,), 3.3),
        ],
        1,
    )
    scale = torch.rand(n, 5) * 0.3 + 0.1

    def posterior(rows=slice(None)):
        return mean_field(loc[rows], scale[rows], g.decay)

    def guide(*args):
        with pyro.plate("spikes", n):
            for name, q in posterior().items():
                pyro.sample(name, q)

    pyro.set_rng_seed(0)
    with pyro.validation_enabled(False):
        theirs = -Trace_ELBO(
            num_particles=draws, vectorize_particles=True, max_plate_nesting=1
        ).differentiable_loss(model, guide, amplitudes, real, slot_xy, sigma, g)
    rows = torch.arange(n).repeat(draws)  # every spike drawn `draws` times
    ours = (
        elbo(posterior(rows), amplitudes[rows], real[rows], slot_xy[rows], sigma[rows], g)
        .reshape(draws, n)
        .sum(1)
    )
    standard_error = float(ours.std()) / draws**0.5
    assert abs(float(ours.mean()) - float(theirs)) < 3 * 2**0.5 * standard_error, (
        float(ours.mean()),
        float(theirs),
        standard_error,
    )


@pytest.mark.parametrize(
    "probe, encoder",
    [
        (lambda s: s.neuropixels2_like_probe(32), "neuropixels2"),
        (lambda s: s.neuropixels2_like_probe(64, num_shanks=2), "neuropixels2"),
        (lambda s: s.linear_probe(24, 25.0), "scratch"),
    ],
)
def test_a_probe_starts_from_the_encoder_shipped_for_its_layout(probe, encoder):
    """A shorter or multi-shank version of a family shares its neighbourhood, so its encoder;
    a layout with none shipped trains from scratch."""
    from locsort import simulate

    recording, _ = simulate.generate_recording(
        duration=5.0, num_units=10, seed=3, probe=probe(simulate)
    )
    prep = prepare(recording, params_with(encoder_init_epochs=1, min_training_spikes=50))
    _, localizer = locate(prep, None, progress=False)
    assert localizer.history["started_from"] == encoder
