r"""Pretrain the encoders shipped in locsort/localize/pretrained/ (one per probe type).

Each is trained exactly as ``locsort.localize`` trains an encoder (ELBO, 30 epochs from scratch,
amplitudes read with the recording's amplitude denoiser), on the pooled training samples of
several SpikeInterface-generated recordings of its probe type: 60 s each, 50 units, noise 5, 10,
15 and 20 µV, seeds 200-203, which no test or benchmark uses. Amplitudes are pooled in noise units:
each recording's are rescaled to the first one's per-channel noise (the model is unchanged when
signal and noise scale together). A recording's own training then starts from these weights and
fitted globals (``encoder_init``) and needs a few epochs instead of 30.

Re-run on CPU (about 3 minutes on a 2-core machine):

    python scripts/pretrain_encoder.py [--probes neuropixels1 square_mea_15um neuropixels2] \
        [--out-dir locsort/localize/pretrained]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import locsort
from locsort.localize import make_localizer
from locsort.localize.pretrained import ENCODER_PATHS
from locsort.params import Params
from locsort.prepare import prepare
from locsort.sample import denoised_sample
from locsort.simulate import (
    generate_recording,
    neuropixels2_like_probe,
    neuropixels_like_probe,
    square_mea_probe,
)

PROBES = {
    "neuropixels1": (
        "64-channel Neuropixels-1.0-like probe (4 staggered columns, 16 µm / 40 µm)",
        lambda: neuropixels_like_probe(64),
    ),
    "square_mea_15um": ("10 x 10 square MEA, 15 µm pitch", lambda: square_mea_probe(10, 15.0)),
    "neuropixels2": (
        "64-channel Neuropixels-2.0-like probe (2 aligned columns, 32 µm / 15 µm)",
        lambda: neuropixels2_like_probe(64),
    ),
}


def pooled_sample(
    probe_name: str, seeds: list[int], noise_levels: list[float], duration: float, params: Params
):
    """(observations, neighbourhood, noise, descriptions): every recording's training sample, its
    amplitudes rescaled to the first recording's noise levels."""
    description, make_probe = PROBES[probe_name]
    parts, reference, neighbourhood, described = [], None, None, []
    for seed, noise_level in zip(seeds, noise_levels):
        recording, _ = generate_recording(
            duration=duration, num_units=50, noise_level=noise_level, seed=seed, probe=make_probe()
        )
        prep = prepare(recording, params)
        sample, _ = denoised_sample(prep, make_localizer("locsort", params), None, progress=True)
        observations = sample.observations
        if reference is None:
            reference, neighbourhood = prep.noise, prep.neighbourhood
        slots = neighbourhood.index[
            observations["centres"]
        ]  # (n, J, K) channel of each slot, -1 virtual
        scale = np.where(
            slots >= 0, reference[np.maximum(slots, 0)] / prep.noise[np.maximum(slots, 0)], 0.0
        )
        parts.append(
            {
                "centres": observations["centres"],
                "amplitudes": (observations["amplitudes"] * scale).astype(np.float32),
            }
        )
        described.append(
            f"spikeinterface generate_ground_truth_recording, {description}, {duration:g} s, "
            "50 units, "
            f"noise {noise_level:g}, seed {seed}: {len(observations['centres'])} spikes"
        )
        print(described[-1], flush=True)
    pooled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return pooled, neighbourhood, reference, described


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES))
    parser.add_argument("--out-dir", default=str(next(iter(ENCODER_PATHS.values())).parent))
    parser.add_argument("--seeds", type=int, nargs="+", default=[200, 201, 202, 203])
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[5.0, 10.0, 15.0, 20.0])
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    if len(args.seeds) != len(args.noise_levels):
        parser.error("give one noise level per seed")

    params = Params(seed=0, encoder_init=None)  # localize()'s defaults, trained from scratch
    for name in args.probes:
        start = time.perf_counter()
        observations, neighbourhood, noise, recordings = pooled_sample(
            name, args.seeds, args.noise_levels, args.duration, params
        )
        encoder = make_localizer("locsort", params).fit(
            observations, neighbourhood, noise, params, progress=True
        )
        if encoder.net is None:
            raise SystemExit(
                f"{name}: the encoder could not be trained ({encoder.fallback_reason})"
            )
        history = encoder.history
        info = {
            "name": name,
            "made_by": "scripts/pretrain_encoder.py",
            "locsort_version": locsort.__version__,
            "recordings": recordings,
            "amplitudes": "rescaled to the first recording's noise levels",
            "training": {
                "epochs": history["epochs"],
                "train_examples": history["train_examples"],
                "held_out_loss_per_spike": round(history["val_loss_per_spike"][-1], 4),
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
        out = Path(args.out_dir) / ENCODER_PATHS[name].name
        out.parent.mkdir(parents=True, exist_ok=True)
        encoder.save(out, info)
        print(
            f"wrote {out} in {info['seconds']} s "
            f"({history['epochs']} epochs on {history['train_examples']} spikes)",
            flush=True,
        )


if __name__ == "__main__":
    main()
