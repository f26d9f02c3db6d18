"""Long recordings (issue 5): time and peak memory of ``locsort run`` on generated 384-channel
Neuropixels-like recordings of 1, 4 and 16 minutes, and throughput with a 2-worker Dask
LocalCluster.

Recordings: SpikeInterface's generator on a locally built 384-channel Neuropixels-like probe
(150 units, noise 5 µV, seed 0), written once to an int16 raw binary file (1 µV per bit) under
benchmarks/data (1 min = 1.4 GB; the generator writes about 4 minutes per minute of 384
channels, so the 4- and 16-minute files (22 GB) are the 1-minute file repeated: the same
spike density, hence the same work per second), then sorted from the file as a user would:
``locsort run FILE.bin --sampling-frequency 30000 --num-channels 384 --dtype int16 --probe ...``.

Each run is a separate process; peak memory is the largest sum of the resident set sizes of
that process and all its children (the Dask workers), sampled every 0.1 s with psutil.

Targets: 16-minute time / 1-minute time <= 17 (linear), 16-minute peak <= 1.3 x 1-minute peak
(flat), and the whole pipeline at least 2 x real time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

import numpy as np

from _common import DATA, command_line, load_results, machine, save_results, verdict, write_section

FS = 30_000
CHANNELS = 384
UNITS = 150


def recording_file(minutes: float):
    """The raw int16 file and its probe, generated and written once."""
    import probeinterface as pi

    from locsort.simulate import generate_recording

    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"np384_{minutes:g}min.bin"
    probe = DATA / "np384_probe.json"
    if (
        path.exists()
        and probe.exists()
        and path.stat().st_size == int(minutes * 60 * FS) * CHANNELS * 2
    ):
        return path, probe
    if minutes != 1 and float(minutes).is_integer():  # the 1-minute file, repeated
        one, probe = recording_file(1)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(int(minutes)):
                with open(one, "rb") as source:
                    shutil.copyfileobj(source, f, length=64 * 2**20)
        tmp.replace(path)
        return path, probe
    recording, _ = generate_recording(
        duration=minutes * 60, num_units=UNITS, noise_level=5.0, seed=0, num_channels=CHANNELS
    )
    pi.write_probeinterface(probe, recording.get_probe())
    tmp = path.with_suffix(".tmp")
    n = recording.get_num_samples(0)
    with open(tmp, "wb") as f:
        for start in range(0, n, FS):
            traces = recording.get_traces(start_frame=start, end_frame=min(start + FS, n))
            f.write(np.clip(np.round(traces), -32768, 32767).astype(np.int16).tobytes())
            print(f"\rwriting {path.name}: {start / n:.0%}", end="", file=sys.stderr)
    print(file=sys.stderr)
    tmp.replace(path)
    return path, probe


def run_locsort(path, probe, out, workers: int | None, params: dict | None = None) -> dict:
    """Wall time and peak RSS (process tree) of one ``locsort run`` (``params``: --param
    overrides)."""
    import psutil

    command = [
        "locsort",
        "run",
        str(path),
        "--sampling-frequency",
        str(FS),
        "--num-channels",
        str(CHANNELS),
        "--dtype",
        "int16",
        "--probe",
        str(probe),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
    ]
    if workers:
        command += ["--workers", str(workers)]
    for name, value in (params or {}).items():
        command += ["--param", f"{name}={value}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"locsort run failed: {stderr[-2000:]}")
    info = json.loads((out / "run.json").read_text())
    return {
        "wall_s": wall,
        "peak_rss_mb": peak / 2**20,
        "num_spikes": info["num_spikes"],
        "num_units": info["num_units"],
        "timings_s": info["timings_s"],
        "duration_s": info["recording"]["duration_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, nargs="+", default=[1, 4, 16], help="recording durations"
    )
    parser.add_argument(
        "--workers-minutes",
        type=float,
        default=4,
        help="duration also run with a 2-worker LocalCluster",
    )
    parser.add_argument(
        "--skip-done",
        action="store_true",
        help="keep runs already in benchmarks/results/scale.json "
        "whose output is still in benchmarks/data/scale_runs (resume an interrupted benchmark)",
    )
    args = parser.parse_args()

    results = load_results("scale")
    out = DATA / "scale_runs"
    for minutes in args.minutes:
        path, probe = recording_file(minutes)
        runs = (
            [None, 2] if minutes == args.workers_minutes else [None]
        )  # single process first: Dask is compared with it
        for workers in runs:
            key = f"{minutes:g} min, " + (
                f"{workers} Dask workers" if workers else "single process"
            )
            folder = out / f"{minutes:g}min_{workers or 1}"
            if args.skip_done and key in results and (folder / "spikes.npy").exists():
                continue
            print(f"{key} ...", file=sys.stderr, flush=True)
            results[key] = {
                "minutes": minutes,
                "workers": workers or 0,
                **run_locsort(path, probe, folder, workers),
            }
            if workers:  # Dask must give the single-process result exactly
                single, dask = (
                    np.load(out / f"{minutes:g}min_1" / "spikes.npy"),
                    np.load(folder / "spikes.npy"),
                )
                results[key]["identical_to_single_process"] = len(single) == len(dask) and all(
                    np.array_equal(single[f], dask[f], equal_nan=single[f].dtype.kind == "f")
                    for f in single.dtype.names
                )
            save_results("scale", results)
            print(
                f"  {results[key]['wall_s']:.1f} s, peak {results[key]['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    shutil.rmtree(out, ignore_errors=True)
    write_section("scale", report(results))


def report(results: dict) -> str:
    rows = sorted(results.values(), key=lambda r: (r["workers"], r["minutes"]))
    lines = [
        "## Long recordings: time, memory, Dask (issue 5)",
        "",
        f"Command: `{command_line()}`. Machine: {machine()}.",
        "",
        f"Data: a generated 384-channel Neuropixels-like minute ({UNITS} units, noise 5 µV, "
        "seed 0) written as int16 raw binary, repeated for 4 and 16 minutes, and sorted from "
        "the file by `locsort run` "
        "(default parameters), one process per run. Peak memory: largest summed RSS of the "
        "run's process tree (Dask workers included), sampled every 0.1 s.",
        "",
        "| recording | runner | wall time | x real time | peak memory | spikes | units "
        "| main pass (detect + localize + neural) | analyzer and units.tsv "
        "| fixed stages (preprocess, fit, train, cluster, analyzer, report) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings_s"]
        main_pass = t.get("detect", 0) + t.get("localize", 0) + t.get("neural", 0)
        lines.append(
            f"| {r['minutes']:g} min "
            f"| {'%d Dask workers' % r['workers'] if r['workers'] else 'single process'} | "
            f"{r['wall_s']:.0f} s | {r['duration_s'] / r['wall_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} MB | {r['num_spikes']:,} | "
            f"{r['num_units']} | {main_pass:.0f} s | "
            + (f"{t['analyzer']:.1f} s" if "analyzer" in t else "–")
            + f" | {r['wall_s'] - main_pass:.0f} s |"
        )
    single = {r["minutes"]: r for r in rows if not r["workers"]}
    lines.append("")
    if 1 in single and 16 in single:
        time_ratio = single[16]["wall_s"] / single[1]["wall_s"]
        memory_ratio = single[16]["peak_rss_mb"] / single[1]["peak_rss_mb"]
        lines.append(
            f"- Time, 16 min / 1 min: {time_ratio:.2f} (target <= 17): "
            f"**{verdict(time_ratio <= 17)}**."
        )
        lines.append(
            f"- Peak memory, 16 min / 1 min: {memory_ratio:.2f} (target <= 1.3): "
            f"**{verdict(memory_ratio <= 1.3)}**."
        )
    for r in rows:
        if r["minutes"] == max(single, default=0) or r["workers"]:
            speed = r["duration_s"] / r["wall_s"]
            lines.append(
                f"- Whole pipeline on {r['minutes']:g} min, "
                f"{'%d Dask workers' % r['workers'] if r['workers'] else 'single process'}: "
                f"{speed:.2f} x real time (target >= 2): **{verdict(speed >= 2)}**."
            )
            if "identical_to_single_process" in r:
                lines.append(
                    f"- {r['workers']} Dask workers vs single process on {r['minutes']:g} min: "
                    "spikes, locations and units "
                    f"{'identical' if r['identical_to_single_process'] else 'DIFFERENT'}."
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
