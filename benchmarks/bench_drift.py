"""Drift (issue 43): how well locsort finds the probe's motion, and how well it sorts while the
probe moves, against SpikeInterface's motion presets and the peers' own corrections.

Recordings: SpikeInterface's ``generate_drifting_recording`` on a 128-channel
Neuropixels-1.0-like probe built here (``locsort.simulate.generate_drifting``; nothing is
downloaded), 300 s, 100 units, the same spikes static and drifting. Scenarios: a rigid ±20 µm
zigzag, the zigzag non-rigid (twice as large at the bottom as at the top), jumps (steps of
20 µm every 30 to 90 s) and a random walk (±20 µm); seeds 0, 1, 2. Each drifting recording is
saved once to a binary folder (every method then reads the same file), and removed afterwards.

Part ``motion`` (every scenario and seed):
- locsort: its localizer fitted on the training sample, then the motion stage's two steps called
  here one by one so that the variants share one pass: the pass that localizes every spike, then
  DREDge on their posterior depths, rigid or non-rigid as ``motion="auto"`` chooses for the
  probe. Variants on the same spikes: DREDge with its own temporal smoothing (1 s, locsort
  uses 0.5 s), and the other of rigid / non-rigid.
- SpikeInterface's ``compute_motion`` presets on locsort's preprocessed recording: dredge_fast,
  rigid_fast, kilosort_like, nonrigid_fast_and_accurate, and dredge with
  ``batching_mode="full"``.
- Error, as SpikeInterface's motion benchmark scores it: the true displacement of the units
  nearest each of the estimate's depth bins, at its time bins; both without their median;
  RMS and 95th percentile of |error| over the bins after the drift starts.
- Time: locsort's pass + DREDge against each preset's whole ``compute_motion`` (detection,
  localization, estimation); locsort's DREDge step alone is given too.

Part ``sorting`` (zigzag and jumps, seed 0 by default): locsort on the static recording, and on
the drifting one with motion off, with motion (auto) and with the true motion (the oracle: a
motion folder made from the truth); spykingcircus2 (its default DREDge correction) and
tridesclous2 (``apply_motion_correction=True``) on the drifting one; kilosort4 on request
(``--peers``; about 25 min per minute of 128 channels on this CPU, so it runs on a 60 s zigzag:
``--parts sorting --sorting-scenarios zigzag --duration 60 --peers spykingcircus2 tridesclous2
kilosort4``).

Part ``still``: the bench_sorting recordings (no drift), locsort with ``motion="auto"`` (the
default) against motion off: accuracy and wall time.

Part ``biophysical``: MEArec recordings made from drifting templates (a Neuropixels 1.0
128-channel library simulated with NEURON by the shared ``make_templates.py``, 6 positions per
cell model, seed 3, made once under benchmarks/data: about 15 min, needs
``pip install neuron==9.0.2 LFPy`` and gcc), 30 cells, 120 s, noise 10 µV: a slow rigid
triangular drift (20 µm/min, 30 µm wide) and sudden jumps (5 to 20 µm every 30 s), and the same
spikes with no drift. Motion error as in part ``motion`` (the truth: each cell's depth over time
from MEArec's drift vectors, ``extract_units_drift_vector``); sorting: locsort on the recording
without drift, and on the drifting one with motion off and auto; spykingcircus2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

import numpy as np

from _common import (
    DATA,
    SHARED,
    command_line,
    command_lines,
    load_results,
    machine,
    save_results,
    verdict,
    write_section,
)

SCENARIOS = ("zigzag", "nonrigid", "jumps", "random_walk")
AMPLITUDE_UM = {"zigzag": 20.0, "nonrigid": 20.0, "jumps": 10.0, "random_walk": 20.0}
PRESETS = {
    "dredge_fast": {},
    "rigid_fast": {},
    "kilosort_like": {},
    "nonrigid_fast_and_accurate": {},
    "dredge": {"estimate_motion_kwargs": {"batching_mode": "full"}},
}
LOCSORT = "locsort (auto)"
PEERS = ("spykingcircus2", "tridesclous2")
MIN_COMPARABLE_UM = 0.01  # a preset this exact leaves no ratio to state
TEMPLATES = ("Neuropixels-128", "6", "3")  # make_templates.py: probe, positions per cell, seed
BIOPHYSICAL = {
    "slow drift": ["--drifting", "slow", "--drift-velocity", "20", "--drift-amplitude", "30"],
    "jumps": ["--drifting", "fast", "--jump-period", "30", "--jump-max", "20"],
}
BIOPHYSICAL_S = 120.0


def drifting_recording(scenario: str, seed: int, duration: float, units: int):
    """(Drifting truth, the drifting recording read back from its binary folder, folder)."""

    from locsort.simulate import generate_drifting

    truth = generate_drifting(
        scenario,
        duration=duration,
        num_units=units,
        num_channels=128,
        seed=seed,
        amplitude_um=AMPLITUDE_UM[scenario],
    )
    folder = DATA / "drift" / f"{scenario}_{seed}_{duration:g}s"
    return truth, saved(truth.drifting, folder), folder


def saved(recording, folder):
    """``recording`` read back from a binary folder, written there once."""
    from spikeinterface.core import load

    if not (folder / "si_folder.json").exists():
        recording.save(
            folder=folder, n_jobs=2, chunk_duration="1s", progress_bar=False, overwrite=True
        )
    return load(folder)


def motion_error(motion, truth, start_s: float) -> dict:
    bins = np.asarray(motion.temporal_bins_s[0])
    estimate = np.asarray(motion.displacement[0])
    true = truth.true_motion(bins, np.asarray(motion.spatial_bins_um))
    error = np.abs((estimate - np.median(estimate)) - (true - np.median(true)))[bins >= start_s]
    return {
        "rms_um": float(np.sqrt(np.mean(error**2))),
        "p95_um": float(np.percentile(error, 95)),
    }


def run_motion(recording, truth, start_s: float) -> dict:
    from locsort import motion as motion_stage
    from locsort.params import params_with
    from locsort.pipeline import fit_locations, motion_spikes
    from locsort.prepare import prepare
    from locsort.runners import thread_budget
    from spikeinterface.preprocessing import compute_motion

    rows = {}
    params = params_with(motion="auto")
    constants = params.constants
    with thread_budget(params.n_jobs):
        prep = prepare(recording, params)
        located = fit_locations(prep, None, False, neural=True)
        rigid, _ = motion_stage.plan(prep.recording, "auto", constants)
        start = time.perf_counter()
        spikes = motion_spikes(prep, located, False)
        passed = time.perf_counter() - start
        depths = spikes["y"].astype(float)
        for name, is_rigid, dredge in (
            (LOCSORT, rigid, {}),
            ("locsort spikes, DREDge's own smoothing", rigid, {"histogram_time_smooth_s": 1.0}),
            (f"locsort, {'non-rigid' if rigid else 'rigid'}", not rigid, {}),
        ):
            start = time.perf_counter()
            motion = motion_stage.estimate(
                prep.recording, spikes, depths, is_rigid, constants, **dredge
            )
            estimated = time.perf_counter() - start
            rows[name] = {
                **motion_error(motion, truth, start_s),
                "wall_s": passed + estimated,
                "dredge_s": estimated,
                "rigid": bool(is_rigid),
            }
    for preset, kwargs in PRESETS.items():
        start = time.perf_counter()
        try:
            motion = compute_motion(
                prep.recording,
                preset=preset,
                n_jobs=2,
                chunk_duration="1s",
                progress_bar=False,
                **kwargs,
            )
        except Exception as exc:  # a preset failing is a result to report
            rows[preset] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        rows[preset] = {
            **motion_error(motion, truth, start_s),
            "wall_s": time.perf_counter() - start,
        }
    return rows


def oracle_motion(truth, recording, folder):
    """A motion folder of the true displacement (1 s bins, depths every 40 µm)."""
    from spikeinterface.core.motion import Motion

    duration = recording.get_duration()
    bins = np.arange(0.5, duration, 1.0)
    locations = recording.get_channel_locations()[:, 1]
    depths = np.arange(locations.min(), locations.max() + 1, 40.0)
    Motion([truth.true_motion(bins, depths)], [bins], depths).save(folder, overwrite=True)
    return folder


def sorting_rows(still, recording, gt, peers, still_label: str, extra: dict) -> dict:
    """locsort on the recording without drift (``still``) and on the drifting one with motion off,
    auto and each of ``extra`` (label: parameters); the peers with their motion correction on."""
    from bench_sorting import run_locsort, run_peer, warm_up

    workdir = DATA / "sorter_runs"
    warm_up(["locsort", *peers], recording, workdir)
    rows = {
        still_label: run_locsort(still, gt, {}),
        "locsort, motion off": run_locsort(recording, gt, {"motion": None}),
        LOCSORT: run_locsort(recording, gt, {}),
        **{label: run_locsort(recording, gt, params) for label, params in extra.items()},
    }
    for peer in peers:
        params = {"apply_motion_correction": True} if peer == "tridesclous2" else {}
        rows[peer] = run_peer(recording, gt, peer, workdir, **params)
    for row in rows.values():
        row.pop("locations", None)
    return rows


def run_sorting(truth, recording, folder, peers) -> dict:
    static_folder = folder.with_name(folder.name + "_static")
    static = saved(truth.static, static_folder)
    oracle = oracle_motion(truth, recording, folder.with_name(folder.name + "_oracle"))
    rows = sorting_rows(
        static,
        recording,
        truth.truth,
        peers,
        "locsort, static recording",
        {"locsort, true motion": {"motion": str(oracle)}},
    )
    shutil.rmtree(static_folder, ignore_errors=True)
    shutil.rmtree(oracle, ignore_errors=True)
    return rows


def mearec_file(name: str, arguments: list) -> str:
    """A MEArec recording from the drifting template library, made once (both files cached)."""
    mearec = SHARED / "data" / "mearec"
    templates = DATA / "mearec" / f"np1_drift_templates_{'_'.join(TEMPLATES[1:])}.h5"
    if not templates.exists():
        templates.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(mearec / "make_templates.py"), *TEMPLATES, str(templates)]
            + ["--drifting"],
            check=True,
        )
    path = DATA / "mearec" / f"np1_{name.replace(' ', '_')}_{BIOPHYSICAL_S:g}s.h5"
    subprocess.run(
        [sys.executable, str(mearec / "make_recording.py"), str(templates), str(path)]
        + ["--duration", f"{BIOPHYSICAL_S:g}", "--n-exc", "16", "--n-inh", "14", "--seed", "0"]
        + arguments,
        check=True,
        capture_output=True,
    )
    return str(path)


def mearec_drifting(name: str):
    """(Drifting truth, the drifting recording in a binary folder, folder) for one of
    BIOPHYSICAL; the static recording is the same spikes made without drift."""
    from MEArec import load_recordings
    from MEArec.tools import extract_units_drift_vector

    from locsort.simulate import Drifting, read_mearec_ground_truth

    drifting, truth = read_mearec_ground_truth(mearec_file(name, BIOPHYSICAL[name]))
    static, _ = read_mearec_ground_truth(mearec_file("no drift", []))
    depths, times = extract_units_drift_vector(
        recgen=load_recordings(
            mearec_file(name, BIOPHYSICAL[name]),
            load=["spiketrains", "templates"],
            load_waveforms=False,
            return_h5_objects=False,
        )
    )
    order = [int(str(u).lstrip("#")) for u in truth.sorting.unit_ids]
    displacements = depths[:, order] - truth.unit_locations[:, 1]
    folder = DATA / "drift" / f"mearec_{name.replace(' ', '_')}_{BIOPHYSICAL_S:g}s"
    recording = saved(drifting, folder)
    return Drifting(static, recording, truth, displacements, times), recording, folder


def run_biophysical(peers) -> dict:
    rows = {}
    for name in BIOPHYSICAL:
        truth, recording, _ = mearec_drifting(name)
        still = saved(truth.static, DATA / "drift" / f"mearec_no_drift_{BIOPHYSICAL_S:g}s")
        rows[name] = {
            "motion": run_motion(recording, truth, 0.0),
            "sorting": sorting_rows(still, recording, truth.truth, peers, "locsort, no drift", {}),
        }
        print(name, json.dumps(rows[name], default=float), flush=True)
    return rows


def run_still() -> dict:
    from bench_sorting import RECORDINGS, load_raw, run_locsort

    rows = {}
    for name in RECORDINGS:
        recording, truth = load_raw(name, 60.0)
        run_locsort(recording.frame_slice(0, 300_000), None, {})  # warm-up, not counted
        rows[name] = {}
        for label, params in (("motion off", {"motion": None}), ("motion auto", {})):
            row = run_locsort(recording, truth, params)
            row.pop("locations", None)
            rows[name][label] = row
            print(name, label, json.dumps(row, default=float), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["motion", "sorting", "biophysical", "still"],
        choices=["motion", "sorting", "biophysical", "still"],
    )
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--sorting-scenarios", nargs="+", default=["zigzag", "jumps"], choices=SCENARIOS
    )
    parser.add_argument("--peers", nargs="+", default=list(PEERS))
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the saved recordings")
    parser.add_argument(
        "--redo", action="store_true", help="run motion recordings already in the results again"
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results = load_results("drift")
    if not args.report_only:
        from spikeinterface.core import set_global_job_kwargs

        import locsort  # noqa: F401  (registers the plug-ins)

        set_global_job_kwargs(n_jobs=2, chunk_duration="1s", progress_bar=False)
        start_s = args.duration / 6
        for scenario in args.scenarios if "motion" in args.parts else []:
            for seed in args.seeds:
                if f"{scenario} seed {seed}" in results.get("motion", {}) and not args.redo:
                    continue
                truth, recording, folder = drifting_recording(
                    scenario, seed, args.duration, args.units
                )
                rows = run_motion(recording, truth, start_s)
                results.setdefault("motion", {})[f"{scenario} seed {seed}"] = {
                    "rows": rows,
                    "command": command_line(),
                    "machine": machine(),
                }
                print(scenario, seed, json.dumps(rows, default=float), flush=True)
                save_results("drift", results)
                if not args.keep and not (
                    "sorting" in args.parts and scenario in args.sorting_scenarios and seed == 0
                ):
                    shutil.rmtree(folder, ignore_errors=True)
        for scenario in args.sorting_scenarios if "sorting" in args.parts else []:
            truth, recording, folder = drifting_recording(scenario, 0, args.duration, args.units)
            rows = run_sorting(truth, recording, folder, args.peers)
            name = f"{scenario} seed 0, {args.duration:g} s"
            results.setdefault("sorting", {})[name] = {
                "rows": rows,
                "command": command_line(),
                "machine": machine(),
            }
            print(scenario, json.dumps(rows, default=float), flush=True)
            save_results("drift", results)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        if "biophysical" in args.parts:
            results["biophysical"] = {
                "rows": run_biophysical(args.peers),
                "command": command_line(),
                "machine": machine(),
            }
            save_results("drift", results)
        if "still" in args.parts:
            results["still"] = {
                "rows": run_still(),
                "command": command_line(),
                "machine": machine(),
            }
            save_results("drift", results)
    write_report(results)


def motion_lines(entries: dict) -> list[str]:
    """The motion error table of ``entries`` (recording name: {method: row}) and its verdicts."""
    methods = list(next(iter(entries.values())))
    lines = [
        "| recording | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for name, rows in entries.items():
        cells = []
        for method in methods:
            r = rows.get(method, {})
            cells.append(
                "failed"
                if "error" in r or not r
                else f"{r['rms_um']:.2f} / {r['p95_um']:.2f} ({r['wall_s']:.0f} s)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    met_error, met_time, ratios, dredge_only = [], [], [], []
    for name, rows in entries.items():
        ours = rows[LOCSORT]
        presets = {k: v for k, v in rows.items() if k in PRESETS and "error" not in v}
        best = min(presets, key=lambda k: presets[k]["rms_um"])
        if presets[best]["rms_um"] < MIN_COMPARABLE_UM:
            met_error.append(False)
            ratios.append(f"{name}: {ours['rms_um']:.2f} µm against {best}'s 0.00")
            continue
        ratio = ours["rms_um"] / presets[best]["rms_um"]
        met_error.append(ratio <= 0.8)
        ratios.append(f"{name}: {ratio:.2f} x {best}")
        if "dredge_fast" in presets:
            met_time.append(ours["wall_s"] / presets["dredge_fast"]["wall_s"])
            dredge_only.append(ours["dredge_s"] / presets["dredge_fast"]["wall_s"])
    lines.append(
        "- Target: locsort's RMS error at most 0.8 x the best preset's on every recording: "
        f"{verdict(all(met_error))} ({'; '.join(ratios)})."
    )
    if met_time:
        lines.append(
            "- Target: estimation at most 0.25 x dredge_fast's wall time: "
            f"{verdict(max(met_time) <= 0.25)} (locsort's pass + DREDge: "
            f"{min(met_time):.2f}-{max(met_time):.2f} x; its DREDge step alone, on "
            f"locations that exist: {min(dredge_only):.3f}-{max(dredge_only):.3f} x)."
        )
    return lines + [""]


def sorting_lines(name: str, rows: dict, still: str) -> list[str]:
    """One recording's sorting table and its verdicts against ``rows[still]`` and the peers."""
    lines = [
        f"#### {name}",
        "",
        "| run | wall s | mean accuracy | units >= 0.8 | false-positive units |",
        "|---|---|---|---|---|",
    ]
    for run, r in rows.items():
        if "error" in r:
            lines.append(f"| {run} | {r['wall_s']:.0f} | failed: {r['error']} | | |")
            continue
        lines.append(
            f"| {run} | {r['wall_s']:.0f} | {r['mean_accuracy']:.3f} | "
            f"{r['well_detected']}/{r['num_gt_units']} | {r['false_positive_units']} |"
        )
    ours = rows[LOCSORT]
    ratio = ours["mean_accuracy"] / rows[still]["mean_accuracy"]
    lines += [
        "",
        f"- Target: drifting accuracy at least 0.97 x without drift: "
        f"{verdict(ratio >= 0.97)} ({ratio:.3f}).",
    ]
    peers = {
        k: v
        for k, v in rows.items()
        if k in ("spykingcircus2", "tridesclous2", "kilosort4") and "error" not in v
    }
    if peers:
        best = max(peers, key=lambda k: peers[k]["mean_accuracy"])
        met = (
            ours["mean_accuracy"] >= peers[best]["mean_accuracy"]
            and ours["false_positive_units"] <= peers[best]["false_positive_units"]
        )
        lines.append(
            f"- Target: at least the best peer ({best}, {peers[best]['mean_accuracy']:.3f}, "
            f"{peers[best]['false_positive_units']} false-positive units), with no more "
            f"false-positive units: {verdict(met)}."
        )
    return lines + [""]


def write_report(results: dict) -> None:
    lines = ["## Drift: motion and sorting while the probe moves (issue 43)", ""]
    motion = results.get("motion", {})
    if motion:
        first = next(iter(motion.values()))
        seeds = sorted({int(name.rsplit(" ", 1)[1]) for name in motion})
        lines += [
            *command_lines(entry["command"] for entry in motion.values()),
            "",
            f"Machine: {first['machine']}. Seeds run: {', '.join(map(str, seeds))}"
            + ("" if len(seeds) >= 3 else " (the issue asks for 3; `--seeds 2` adds one)")
            + ".",
            "",
            "### Motion error (µm, after the drift starts; RMS / 95th percentile) and wall time",
            "",
            *motion_lines({name: entry["rows"] for name, entry in motion.items()}),
        ]
    sorting = results.get("sorting", {})
    if sorting:
        lines += [
            "### Sorting under drift",
            "",
            *command_lines(entry["command"] for entry in sorting.values()),
            "",
            "Accuracy: SpikeInterface `compare_sorter_to_ground_truth` (exhaustive); well "
            "detected = accuracy >= 0.8.",
            "",
        ]
        for name, entry in sorting.items():
            lines += sorting_lines(name, entry["rows"], "locsort, static recording")
            if "kilosort4" not in entry["rows"]:
                lines[-1:-1] = [
                    "- Not run: kilosort4 (about 25 min per minute of 128 channels on this CPU; "
                    "it runs on the 60 s recording)."
                ]
    biophysical = results.get("biophysical")
    if biophysical:
        lines += [
            "### Biophysical drift (MEArec, drifting templates)",
            "",
            f"Command: `{biophysical['command']}`. Machine: {biophysical['machine']}. "
            f"Neuropixels 1.0 128-channel templates simulated with NEURON, 30 cells, "
            f"{BIOPHYSICAL_S:g} s, noise 10 µV; drift from the start.",
            "",
            "Motion error (µm; RMS / 95th percentile) and wall time. The library's cells drift "
            "along paths 30 to 100 µm long (`make_templates.py`), and MEArec moves each by the "
            "same number of steps, so each cell moves by its own amount and no single motion "
            "fits them all; the truth at a depth bin is the nearest cell's, and every method "
            "shares that floor.",
            "",
            *motion_lines({k: v["motion"] for k, v in biophysical["rows"].items()}),
            "Sorting:",
            "",
        ]
        for name, rows in biophysical["rows"].items():
            lines += sorting_lines(name, rows["sorting"], "locsort, no drift")
    still = results.get("still")
    if still:
        lines += [
            "### No drift: motion auto against off",
            "",
            f"Command: `{still['command']}`.",
            "",
            "| recording | off: accuracy / wall s | auto: accuracy / wall s | "
            "accuracy change | wall ratio | what auto did |",
            "|---|---|---|---|---|---|",
        ]
        oks = []
        for name, rows in still["rows"].items():
            off, auto = rows["motion off"], rows["motion auto"]
            change = auto["mean_accuracy"] - off["mean_accuracy"]
            ratio = auto["wall_s"] / off["wall_s"]
            oks.append(abs(change) <= 0.005 and ratio <= 1.10)
            lines.append(
                f"| {name} | {off['mean_accuracy']:.3f} / {off['wall_s']:.1f} | "
                f"{auto['mean_accuracy']:.3f} / {auto['wall_s']:.1f} | {change:+.3f} | "
                f"{ratio:.2f} | motion stage {auto['stages_s'].get('motion', 0):.2f} s |"
            )
        lines += [
            "",
            f"- Target: within ±0.005 accuracy and at most 1.10 x wall time: {verdict(all(oks))}.",
            "",
        ]
    write_section("drift", "\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
