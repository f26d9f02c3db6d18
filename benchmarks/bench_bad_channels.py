"""Bad channels: what flat and noisy channels cost, and what their interpolation wins back.

The 64-channel recording of SpikeInterface's generator (Neuropixels-like probe; 60 s, 50 units,
noise 5 µV, seed 0), sorted by locsort's default pipeline three times: intact; with some
channels damaged as on real probes (flat: zeros, a broken contact; noisy: 60 µV of extra white
noise) and every channel kept as it is (``bad_channels=none``); and damaged with locsort's
default, which finds the damaged channels and interpolates them from their neighbours
(``bad_channels=auto``). Per run: which channels were found, spikes detected, mean accuracy /
well-detected / false-positive units against the ground truth, and the median 2-D error of the
detected spikes' locations.
"""

from __future__ import annotations

import argparse

from _common import command_line, load_results, machine, save_results, verdict, write_section
from bench_sorting import load_raw

FLAT = (10, 40)  # channel indices zeroed
NOISY = (25,)  # channel indices given extra noise
EXTRA_NOISE_UV = 60.0


def run(recording, truth, bad_channels: str | None) -> dict:
    from locsort.evaluate import detected_localization_errors, sorting_accuracy
    from locsort.output import sorting_from_spikes
    from locsort.params import Params
    from locsort.pipeline import sort_spikes
    from locsort.prepare import prepare

    prep = prepare(recording, Params(bad_channels=bad_channels))
    spikes, _, _ = sort_spikes(prep, progress=False)
    sorting = sorting_from_spikes(spikes, prep.recording)
    accuracy = sorting_accuracy(sorting, truth)
    accuracy.pop("accuracy_per_unit", None)
    return {
        "found": {str(c): why for c, why in prep.bad_channels.items()},
        "spikes": int(len(spikes)),
        **accuracy,
        "median_error_um": detected_localization_errors(spikes, prep.recording, truth)[
            "median_xy_um"
        ],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite BENCHMARKS.md from benchmarks/results, run nothing",
    )
    args = parser.parse_args()
    if args.report_only:
        return write_report(load_results("bad_channels"))
    from locsort.simulate import with_bad_channels

    recording, truth = load_raw("np64_generated", 60.0)
    broken = with_bad_channels(recording, FLAT, NOISY, EXTRA_NOISE_UV)
    results = {
        "command": command_line(),
        "flat": [str(recording.channel_ids[c]) for c in FLAT],
        "noisy": [str(recording.channel_ids[c]) for c in NOISY],
        "rows": {},
    }
    for label, rec, setting in (
        ("intact", recording, "auto"),
        ("damaged, kept as they are (bad_channels=none)", broken, None),
        ("damaged, interpolated (default: bad_channels=auto)", broken, "auto"),
    ):
        results["rows"][label] = run(rec, truth, setting)
        print(label, results["rows"][label], flush=True)
    save_results("bad_channels", results)
    write_report(results)


def write_report(results):
    rows = results["rows"]
    intact, kept, fixed = (rows[k] for k in rows)
    lines = [
        "## Bad channels (flat and noisy contacts)",
        "",
        f"`{results['command']}`",
        "",
        f"Machine: {machine()}. Data: the generated 64-channel Neuropixels-like recording "
        f"(60 s, 50 units, noise 5 µV, seed 0); damaged copy: channels "
        f"{', '.join(results['flat'])} zeroed (flat), channel(s) "
        f"{', '.join(results['noisy'])} given {EXTRA_NOISE_UV:g} µV of extra white noise. "
        "locsort's default pipeline; accuracy by SpikeInterface's "
        "`compare_sorter_to_ground_truth`; location error: median 2-D "
        "distance of the detected spikes that match a true spike to their unit's position.",
        "",
        "| run | channels found bad | spikes | mean accuracy | units >= 0.8 | false-positive units "
        "| median location error (µm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        found = ", ".join(f"{c} ({why.split(',')[0]})" for c, why in r["found"].items()) or "none"
        if label.startswith("damaged, kept"):
            found = "not searched"
        lines.append(
            f"| {label} | {found} | {r['spikes']:,} | {r['mean_accuracy']:.3f} "
            f"| {r['well_detected']}/{r['num_gt_units']} "
            f"| {r['false_positive_units']} | {r['median_error_um']:.2f} |"
        )
    recovered = (fixed["mean_accuracy"] - kept["mean_accuracy"]) / max(
        intact["mean_accuracy"] - kept["mean_accuracy"], 1e-9
    )
    exact = (
        set(fixed["found"]) == set(results["flat"]) | set(results["noisy"]) and not intact["found"]
    )
    lines += [
        "",
        f"- damaged channels found, and none on the intact recording: {verdict(exact)}",
        f"- accuracy lost to the damage that interpolation wins back: {100 * recovered:.0f} %",
        "",
    ]
    write_section("bad_channels", "\n".join(lines))


if __name__ == "__main__":
    main()
