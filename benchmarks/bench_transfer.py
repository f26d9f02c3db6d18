"""Transfer learning of the neural sorter (issue 4), as in the E-Sort paper: labels are the
ground truth of the first half of the recording, restricted to the first K spikes of each
unit (K = 5, 10, 20); the sorting is scored on the second half only. With so few labels a
single training run is noisy (one seed to the next moves a cell by up to 0.2), so each cell
is the mean over several training seeds (``--seeds``). The shipped pretrained
backbone (scripts/pretrain_backbone.py: generated 64-channel Neuropixels-like recordings,
seeds 100-105) is fine-tuned, against the same network trained from scratch.

- same probe type as the pretraining: the generated 64-channel recording (seed 0, not in the
  pretraining set);
- another probe type: the MEArec square MEA (10 x 10, 15 µm pitch, 10 µV), biophysical
  templates from another simulator.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from _common import (
    command_line,
    command_lines,
    load_results,
    machine,
    save_results,
    verdict,
    write_section,
)
from bench_sorting import load_raw

RECORDINGS = {
    "np64_generated": "same probe type as pretraining",
    "sq_10uV": "other probe type (square MEA, MEArec)",
}
BACKBONES = {"pretrained": "pretrained backbone", "none": "from scratch"}


def first_half(sorting, half: int):
    from spikeinterface.core import NumpySorting

    vector = sorting.to_spike_vector()
    keep = vector["sample_index"] < half
    return NumpySorting.from_samples_and_labels(
        [vector["sample_index"][keep]],
        [sorting.unit_ids[vector["unit_index"][keep]]],
        sorting.get_sampling_frequency(),
        unit_ids=sorting.unit_ids,
    )


def score_second_half(sorting, truth, half: int, end: int) -> dict:
    from locsort.evaluate import sorting_accuracy
    from locsort.simulate import GroundTruth

    result = sorting_accuracy(
        sorting.frame_slice(half, end),
        GroundTruth(truth.sorting.frame_slice(half, end), truth.unit_locations),
    )
    result.pop("accuracy_per_unit")
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--recordings", nargs="+", default=list(RECORDINGS), choices=list(RECORDINGS)
    )
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds averaged per cell"
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=list(BACKBONES),
        choices=list(BACKBONES),
        help="rows to run (the others keep their stored results)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite BENCHMARKS.md from benchmarks/results, run nothing",
    )
    args = parser.parse_args()
    if args.report_only:
        return write_report(load_results("transfer"), args)

    import locsort

    results = load_results("transfer")
    for name in args.recordings:
        recording, truth = load_raw(name, args.duration)
        end = recording.get_num_samples(0)
        half = end // 2
        labels = first_half(truth.sorting, half)
        rows = results.setdefault(name, {})
        for k in args.k:
            for backbone in args.backbones:
                runs = []
                for seed in args.seeds:
                    sorting = locsort.sort(
                        recording,
                        params={
                            "label_max_spikes_per_unit": k,
                            "neural_backbone": None if backbone == "none" else backbone,
                            "seed": seed,
                        },
                        labels=labels,
                        progress=False,
                    )
                    runs.append(score_second_half(sorting, truth, half, end))
                rows[f"{backbone}, K={k}"] = {
                    key: float(np.mean([r[key] for r in runs]))
                    for key in ("mean_accuracy", "well_detected", "false_positive_units")
                }
                rows[f"{backbone}, K={k}"].update(
                    seeds=args.seeds,
                    accuracy_per_seed=[r["mean_accuracy"] for r in runs],
                    command=command_line(),
                )
                print(name, backbone, k, json.dumps(rows[f"{backbone}, K={k}"]), flush=True)
                save_results("transfer", results)
    write_report(results, args)


def write_report(results, args):
    from locsort.params import Params

    commands = [row.get("command", "") for rows in results.values() for row in rows.values()]
    lines = [
        "## Neural sorter: transfer learning (issue 4)",
        "",
        *command_lines(commands),
        "",
        f"Machine: {machine()}. Labels: ground truth of the first half, first K spikes per unit; "
        "scored on the second half. Each cell: mean accuracy / units with accuracy >= 0.8 / "
        "false-positive units, each the mean over the training seeds (per-seed accuracies in "
        "benchmarks/results). Both rows imprint the head from the labelled spikes (one prototype "
        "per unit) and then train; a backbone they start from (pretrained or adapted) is frozen "
        f"for the first {Params().constants.neural_frozen_epochs} epochs (neural_frozen_epochs), "
        "then fine-tuned. With labels limited to K per unit, a network is first trained on "
        "locsort's own clustering of a sample of the whole recording (no labels; from the "
        "pretrained backbone in the first row, from random weights in the second) and the "
        "few-label networks fine-tune its backbone; they are an ensemble of "
        f"{Params().constants.few_label_ensemble} networks trained from different seeds, "
        f"each trained with {Params().constants.few_label_synthetic_positives} "
        "synthetic spikes per labelled spike (its unit's mean snippet plus another labelled "
        "spike's noise). That ensemble then labels a sample of the whole recording, and one "
        "network is trained again, from scratch in both rows, on the labelled spikes plus its "
        "labelling (self-training): the rows differ in the backbone's starting point only. "
        "Peeling's unit templates average every "
        "sample spike that the final network assigns to the unit.",
        "",
    ]
    for name, rows in results.items():
        ks = sorted({int(key.split("K=")[1]) for key in rows})
        seeds = sorted({seed for row in rows.values() for seed in row.get("seeds", [])})
        lines += [
            f"### {name}: {RECORDINGS[name]}",
            "",
            f"Training seeds: {', '.join(map(str, seeds))}.",
            "",
            "| | " + " | ".join(f"K = {k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for backbone, label in BACKBONES.items():
            cells = []
            for k in ks:
                r = rows.get(f"{backbone}, K={k}")
                cells.append(
                    f"{r['mean_accuracy']:.3f} / {r['well_detected']:.1f} / "
                    f"{r['false_positive_units']:.1f}"
                    if r
                    else ""
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        p10, s10, s20 = rows.get("pretrained, K=10"), rows.get("none, K=10"), rows.get("none, K=20")
        if p10 and s20:
            met = p10["mean_accuracy"] >= s20["mean_accuracy"]
            lines += [
                "",
                "- target (pretrained at K = 10 >= scratch at K = 20): "
                f"{p10['mean_accuracy']:.3f} vs {s20['mean_accuracy']:.3f} "
                f"(per seed {_seed_range(p10)} vs {_seed_range(s20)}): {verdict(met)}",
            ]
            if s10:  # what the backbone is worth against what ten more labels per unit are worth
                lines.append(
                    "- at K = 10 the pretrained backbone adds "
                    f"{p10['mean_accuracy'] - s10['mean_accuracy']:+.3f} over scratch; "
                    "from scratch, K = 20 adds "
                    f"{s20['mean_accuracy'] - s10['mean_accuracy']:+.3f} over K = 10"
                )
        lines.append("")
    write_section("transfer", "\n".join(lines))


def _seed_range(row) -> str:
    return f"{min(row['accuracy_per_seed']):.3f}-{max(row['accuracy_per_seed']):.3f}"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
