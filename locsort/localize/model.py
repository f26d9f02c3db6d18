"""The generative model of spike amplitudes given a point source, written once: the priors
(``priors``) and the amplitudes' distribution given the latents (``amplitudes_given``). The
Pyro program ``model`` is built from them for NUTS (mcmc.py), and so is ``elbo``, the objective
that trains the encoder of amortized variational inference (amortized.py).

Per spike, relative to its centre channel (µm, SpikeInterface frame):

    x, y       ~ Normal(0, prior_xy)                          position in the probe plane
    z          ~ LogNormal(log prior_z, prior_z_sd)           distance from the probe plane
    log_alpha  ~ Normal(prior_log_alpha, prior_log_alpha_sd)  source amplitude
    log_length ~ Normal(log decay_length, decay_length_sd)    the cell's own decay length
    d_k        = |(x, y, z) - (u_k, v_k, 0)|                  distance to neighbourhood slot k
    s_k        = decay(d_k, alpha)                            noise-free amplitude on slot k
    a_k        ~ Normal(sqrt(s_k^2 + (floor * sigma_k)^2),    observed amplitude, real slots only
                        sqrt((noise_scale * sigma_k)^2 + (rel_error * s_k)^2))

where decay(d, alpha) is alpha * exp(-d / length) (exponential law; log_length exists only
under it) or alpha / d (monopole). z > 0 by construction, and alpha gets a posterior, not a
point estimate.

``a_k`` is the observed negative-peak size on slot k (minus the minimum within a few samples
of the centre's peak). ``sigma_k`` is that channel's noise level measured on the recording,
so posterior widths are in µm and mean something; ``noise_scale`` says how much of that noise an
amplitude reading keeps (readings on denoised snippets keep less than the trace's: fitted, not
assumed 1). Taking the minimum over a window makes a
silent channel read about ``floor * sigma`` rather than 0, hence the sqrt(s^2 + floor^2 sigma^2)
mean; ``rel_error`` absorbs what a point source cannot explain of a real cell (dendrites).
Virtual slots (past the probe edge) are masked out of the likelihood.

The point source is where the cell's current *appears* to come from; the soma is not exactly
there (dendrites and axon pull the electrical centre away from it). The model therefore says
soma = source + offset, offset ~ Normal(0, source_offset_um) per axis in the probe plane. The
offset does not touch the amplitudes, so the soma's posterior is the source posterior widened
by source_offset_um in quadrature (``soma_sd``). Its value, 8 µm, is the residual that remains
when a point source is fitted to noise-free templates of biophysical cells: a property of real
cells, not of noise, which is why posterior widths without it covered the true soma far too
rarely (docs/design-decisions.md, § Localization).

Real cells do not share one decay length (biophysical cell models spread it over a wide range),
hence a per-spike length around a recording-wide median. The global quantities (median decay
length, floor, noise_scale, rel_error) are fitted to the recording (empirical Bayes: learned
with the encoder by maximizing the ELBO) and then held fixed, e.g. for MCMC; the priors are
fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

DECAY_LAWS = ("exponential", "monopole")


def latents(decay: str) -> tuple[str, ...]:
    return ("x", "y", "z", "log_alpha") + (("log_length",) if decay == "exponential" else ())


@dataclass
class ModelGlobals:
    """Recording-level constants of the model (fitted once, then fixed)."""

    decay: str = "exponential"
    decay_length_um: float = (
        28.6  # exponential law, median over cells; the paper fixed beta = -0.035 /µm (28.6 µm)
    )
    decay_length_sd: float = 0.35  # log-space SD of the per-cell decay length
    floor: float = 1.0  # silent-channel reading, in noise SDs
    noise_scale: float = (
        1.0  # SD of an amplitude reading's noise, in trace noise SDs (denoised readings: < 1)
    )
    rel_error: float = 0.15  # multiplicative model error of the point-source law
    prior_xy_um: float = 40.0  # SD of x, y around the centre channel
    prior_z_um: float = 30.0  # median distance from the probe plane
    prior_z_sd: float = 0.8  # log-space SD of z
    prior_log_alpha: float = 5.0  # mean log source amplitude (set from the data)
    prior_log_alpha_sd: float = 1.0
    min_distance_um: float = 1.0  # monopole: no singularity on a contact
    source_offset_um: float = 8.0  # SD per axis of the soma's offset from the point source

    def asdict(self) -> dict:
        return asdict(self)


def soma_sd(source_var, g: ModelGlobals):
    """Posterior SD of the soma's x or y from the posterior variance of the source's."""
    return (source_var + g.source_offset_um**2) ** 0.5


def expected_amplitude(x, y, z, log_alpha, log_length, slot_xy, g: ModelGlobals):
    """Noise-free amplitude on each slot: (..., K) from per-spike (...,) latents and
    (..., K, 2) slots."""
    dx = slot_xy[..., 0] - x[..., None]
    dy = slot_xy[..., 1] - y[..., None]
    d = torch.sqrt(dx * dx + dy * dy + z[..., None] ** 2 + g.min_distance_um**2)
    if g.decay == "exponential":
        return torch.exp(log_alpha[..., None] - d / torch.exp(log_length)[..., None])
    return torch.exp(log_alpha[..., None]) / d


def _global(learned: dict | None, name: str, fixed):
    """A global's value: the tensor being fitted, if it is, else the fixed one."""
    return learned[name] if learned and name in learned else fixed


def likelihood(expected, sigma, g: ModelGlobals, learned: dict | None = None):
    floor = _global(learned, "floor", g.floor)
    rel = _global(learned, "rel_error", g.rel_error)
    noise = _global(learned, "noise_scale", g.noise_scale)
    mean = torch.sqrt(expected**2 + (floor * sigma) ** 2)
    scale = torch.sqrt((noise * sigma) ** 2 + (rel * expected) ** 2)
    return dist.Normal(mean, scale)


def priors(g: ModelGlobals, learned: dict | None = None) -> dict:
    """Each latent's prior for one spike, in ``latents`` order (name -> distribution)."""
    z_median = _global(learned, "prior_z", torch.tensor(g.prior_z_um))
    found = {
        "x": dist.Normal(0.0, g.prior_xy_um),
        "y": dist.Normal(0.0, g.prior_xy_um),
        "z": dist.LogNormal(torch.log(z_median), _global(learned, "prior_z_sd", g.prior_z_sd)),
        "log_alpha": dist.Normal(g.prior_log_alpha, g.prior_log_alpha_sd),
    }
    if g.decay == "exponential":
        length = _global(learned, "decay_length", torch.tensor(g.decay_length_um))
        found["log_length"] = dist.Normal(torch.log(length), g.decay_length_sd)
    return found


def mean_field(loc, scale, decay: str) -> dict:
    """A posterior of independent latents in the priors' families (name -> distribution) from
    per-latent (n, L) location and scale columns in ``latents`` order."""
    return {
        name: (dist.LogNormal if name == "z" else dist.Normal)(loc[:, i], scale[:, i])
        for i, name in enumerate(latents(decay))
    }


def amplitudes_given(values: dict, slot_xy, sigma, g: ModelGlobals, learned: dict | None = None):
    """The distribution of the K slot amplitudes given the latents' ``values`` (name -> (n,))."""
    expected = expected_amplitude(
        values["x"],
        values["y"],
        values["z"],
        values["log_alpha"],
        values.get("log_length"),
        slot_xy,
        g,
    )
    return likelihood(expected, sigma, g, learned)


def model(amplitudes, real, slot_xy, sigma, g: ModelGlobals, learned: dict | None = None):
    """The generative model for a batch of spikes, as a Pyro program (what NUTS samples).

    amplitudes : (n, K) observed negative-peak sizes (µV, >= 0 mostly)
    real : (n, K) bool, slot holds a real channel (virtual slots are masked out)
    slot_xy : (n, K, 2) slot positions relative to the centre channel (µm)
    sigma : (n, K) noise SD of each slot's channel (µV; any positive value for virtual slots)
    learned : tensors replacing the fixed globals (decay_length, z prior, floor, noise_scale,
        rel_error) while they are fitted
    """
    with pyro.plate("spikes", amplitudes.shape[0]):
        values = {name: pyro.sample(name, prior) for name, prior in priors(g, learned).items()}
        obs = amplitudes_given(values, slot_xy, sigma, g, learned).mask(real).to_event(1)
        pyro.sample("amplitudes", obs, obs=amplitudes)


def elbo(
    posterior: dict, amplitudes, real, slot_xy, sigma, g: ModelGlobals, learned: dict | None = None
):
    """Per-spike evidence lower bound of ``model`` under a mean-field ``posterior`` (name ->
    distribution of the same family as the prior): the expected log-likelihood, estimated from
    one reparameterized draw, minus the KL divergence to the prior, in closed form.

    The same quantity as Pyro's Trace_ELBO on ``model`` (tested), computed without Pyro's
    tracing: the encoder's training steps are small and were half Pyro bookkeeping; the exact KL
    also removes the prior terms' sampling noise from the gradients.
    """
    draw = {name: q.rsample() for name, q in posterior.items()}
    log_likelihood = (
        amplitudes_given(draw, slot_xy, sigma, g, learned)
        .log_prob(amplitudes)
        .masked_fill(~real, 0.0)
        .sum(-1)
    )
    kl = sum(kl_divergence(posterior[name], prior) for name, prior in priors(g, learned).items())
    return log_likelihood - kl
