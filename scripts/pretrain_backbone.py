"""Pretrain the neural sorter's backbone shipped in locsort/sort/pretrained/backbone.safetensors.

Recordings: SpikeInterface's generator on the 64-channel Neuropixels-like probe, 60 s each, 50
units, noise 5 µV, seeds 100-105: seeds no test or benchmark uses, so the benchmarks'
recordings (seed 0) and the tests' (seed 1) are not in the training set. Labels are the
generator's ground truth, matched to locsort's candidate events exactly as
``locsort.sort(labels=...)`` does; one head per recording, the backbone shared.

Re-run on CPU (about 3 minutes on a 2-core machine):

    python scripts/pretrain_backbone.py [--out locsort/sort/pretrained/backbone.safetensors]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import locsort
from locsort.params import params_with
from locsort.prepare import prepare
from locsort.sample import training_sample
from locsort.simulate import generate_recording
from locsort.localize import make_localizer
from locsort.sort.labels import labels_from_sorting
from locsort.sort.neural import pretrain_backbone, save_backbone
from locsort.sort.pretrained import BACKBONE_PATH


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(BACKBONE_PATH))
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104, 105])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    start = time.perf_counter()
    # locations are not used here
    params = params_with(localization_method="center_of_mass", seed=0)
    datasets = []
    for seed in args.seeds:
        recording, truth = generate_recording(
            duration=args.duration, num_units=50, noise_level=5.0, seed=seed
        )
        prep = prepare(recording, params)
        labels = labels_from_sorting(truth.sorting, prep.recording)
        sample = training_sample(
            prep,
            make_localizer("center_of_mass", params),
            None,
            progress=True,
            windows=True,
            labels=labels,
        )
        datasets.append((sample.windows, sample.targets, sample.mask))
        print(
            f"seed {seed}: {len(sample.windows)} candidate windows, "
            f"{int(sample.targets.any(1).sum())} labelled",
            flush=True,
        )
    backbone, summary = pretrain_backbone(datasets, epochs=args.epochs, seed=0)
    info = {
        "made_by": "scripts/pretrain_backbone.py",
        "locsort_version": locsort.__version__,
        "recordings": [
            "spikeinterface generate_ground_truth_recording, 64-channel Neuropixels-like probe, "
            f"{args.duration:g} s, "
            f"50 units, noise 5, seed {s}"
            for s in args.seeds
        ],
        "labels": "ground truth",
        "training": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, args.out, info)
    print(
        f"wrote {args.out} in {info['seconds']} s; final train loss {summary['train_loss'][-1]:.4f}"
    )


if __name__ == "__main__":
    main()
