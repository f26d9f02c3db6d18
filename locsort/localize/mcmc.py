"""The reference posterior: NUTS (Pyro) on the same model as the encoder (model.py), with the
globals the encoder fitted held fixed. Slow (it samples every spike's posterior), so it runs
on a subset of spikes, to check the amortized posterior and to measure the speed gap."""

from __future__ import annotations

import time

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median

from .model import ModelGlobals, model, soma_sd


def nuts_localize(
    centres,
    amplitudes,
    neighbourhood,
    noise,
    globals_: ModelGlobals,
    num_samples: int = 300,
    warmup_steps: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Posterior mean and SD of x, y, z (absolute, µm; x, y SDs of the soma, as the encoder's)
    and alpha for each spike, by NUTS.

    ``centres`` (n,) and ``amplitudes`` (n, K) are the spikes' centre channels and their
    neighbourhood amplitudes (the localizer's observations, first centre).
    """
    real = neighbourhood.real[centres]
    sigma = np.where(real, noise[np.maximum(neighbourhood.index[centres], 0)], 1.0)
    args = (
        torch.as_tensor(amplitudes, dtype=torch.float64),
        torch.as_tensor(real),
        torch.as_tensor(neighbourhood.offsets[centres], dtype=torch.float64),
        torch.as_tensor(sigma, dtype=torch.float64),
        globals_,
    )
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    with pyro.validation_enabled(False):
        kernel = NUTS(
            model, init_strategy=init_to_median, max_tree_depth=8, target_accept_prob=0.85
        )
        mcmc = MCMC(
            kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
        )
        mcmc.run(*args)
    seconds = time.perf_counter() - start
    s = {k: v.detach().numpy() for k, v in mcmc.get_samples().items()}
    base = neighbourhood.positions[centres]
    x, y = base[:, 0] + s["x"], base[:, 1] + s["y"]
    return {
        "x": x.mean(0),
        "y": y.mean(0),
        "z": s["z"].mean(0),
        "alpha": np.exp(s["log_alpha"]).mean(0),
        "x_std": soma_sd(x.var(0), globals_),
        "y_std": soma_sd(y.var(0), globals_),
        "z_std": s["z"].std(0),
        "seconds": seconds,
    }
