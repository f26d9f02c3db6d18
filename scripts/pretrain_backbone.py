"""Pretrain the neural sorter's backbone shipped in locsort/sort/pretrained/backbone.safetensors.

Recordings: SpikeInterface's generator, 60 s each, 50 units, on several probe geometries so
that the backbone learns what separates units on any layout, not on one:

- the 64-channel Neuropixels-1.0-like probe of research.md §3 (4 staggered columns), noise 5 µV;
- a Neuropixels-2.0-like probe (2 columns 32 µm apart, 15 µm rows, 64 channels), noise 5 µV;
- a single-column linear probe (20 µm pitch, 32 channels), noise 5 µV;
- the Neuropixels-1.0-like probe again at noise 10 µV (lower SNR).

Seeds 100 and up: seeds no test or benchmark uses (benchmarks use seed 0, tests seed 1). No
square grid is in the set, so the transfer benchmark's square MEA (MEArec, another simulator)
stays a probe type the backbone has never seen. Labels are the generator's ground truth,
matched to locsort's candidate events exactly as ``locsort.sort(labels=...)`` does; one head
per recording, the backbone shared.

Re-run on CPU (about 4 minutes on a 2-core machine):

    python scripts/pretrain_backbone.py [--out locsort/sort/pretrained/backbone.safetensors]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import locsort
from locsort.params import Params
from locsort.pipeline import _training_sample, prepare
from locsort.simulate import generate_recording, neuropixels_like_probe
from locsort.localize import make_localizer
from locsort.sort.labels import labels_from_sorting
from locsort.sort.neural import pretrain_backbone, save_backbone
from locsort.sort.pretrained import BACKBONE_PATH


def probes():
    """(description, probeinterface Probe, noise µV) of each pretraining recording; built
    locally, nothing downloaded."""
    import probeinterface as pi

    def wired(probe):
        probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
        return probe

    np2 = wired(pi.generate_multi_columns_probe(num_columns=2, num_contact_per_column=32, xpitch=32, ypitch=15,
                                                contact_shapes="square", contact_shape_params={"width": 12}))
    linear = wired(pi.generate_linear_probe(num_elec=32, ypitch=20, contact_shapes="circle", contact_shape_params={"radius": 6}))
    return [
        ("64-channel Neuropixels-1.0-like probe (4 staggered columns)", neuropixels_like_probe(64), 5.0),
        ("64-channel Neuropixels-2.0-like probe (2 columns, 32 x 15 µm)", np2, 5.0),
        ("32-channel linear probe (20 µm pitch)", linear, 5.0),
        ("64-channel Neuropixels-1.0-like probe (4 staggered columns)", neuropixels_like_probe(64), 10.0),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BACKBONE_PATH))
    parser.add_argument("--recordings-per-probe", type=int, default=2)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    start = time.perf_counter()
    params = Params(localization_method="center_of_mass", seed=0)  # locations are not used here
    datasets, described = [], []
    seed = 100
    for description, probe, noise in probes():
        for _ in range(args.recordings_per_probe):
            recording, truth = generate_recording(duration=args.duration, num_units=50, noise_level=noise, seed=seed,
                                                  probe=probe)
            prep = prepare(recording, params)
            labels = labels_from_sorting(truth.sorting, prep.recording)
            sample = _training_sample(prep, make_localizer("center_of_mass", params), None, progress=True, windows=True,
                                      labels=labels)
            datasets.append((sample.windows, sample.targets, sample.mask))
            described.append(f"spikeinterface generate_ground_truth_recording, {description}, {args.duration:g} s, "
                             f"50 units, noise {noise:g} µV, seed {seed}")
            print(f"{described[-1]}: {len(sample.windows)} candidate windows, {int(sample.targets.any(1).sum())} labelled",
                  flush=True)
            seed += 1
    backbone, summary = pretrain_backbone(datasets, epochs=args.epochs, seed=0)
    info = {
        "made_by": "scripts/pretrain_backbone.py",
        "locsort_version": locsort.__version__,
        "recordings": described,
        "labels": "ground truth",
        "training": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, args.out, info)
    print(f"wrote {args.out} in {info['seconds']} s; final train loss {summary['train_loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
