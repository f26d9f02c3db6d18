"""What the trace cache costs and saves on a 384-channel recording: ``locsort run`` on the
1-minute file of bench_scale.py with the cache off (``trace_cache_mb=None``: the main pass reads and
filters the training sample's chunks again) and at its default size, one process each, side by
side. Peak memory: largest RSS of the run's process, sampled every 0.1 s."""

from __future__ import annotations

import argparse
import shutil

from _common import DATA, command_line, machine, save_results, write_section
from bench_scale import recording_file, run_locsort

from locsort.params import Params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    args = parser.parse_args()
    path, probe = recording_file(args.minutes)
    default = Params().trace_cache_mb
    runs = {}
    for size in (None, default):
        runs[f"{size or 0:g} MB"] = run_locsort(
            path, probe, DATA / "trace_cache_run", None, {"trace_cache_mb": size}
        )
    shutil.rmtree(DATA / "trace_cache_run", ignore_errors=True)
    save_results("trace_cache", runs)
    off, on = runs["0 MB"], runs[f"{default:g} MB"]
    lines = [
        "## Trace cache: memory against time (384 channels)",
        "",
        f"Command: `{command_line()}`. Machine: {machine()}.",
        "",
        f"Data: the {args.minutes:g}-minute 384-channel file of bench_scale.py, "
        "sorted by `locsort run` with `--param trace_cache_mb=...`.",
        "",
        "| trace_cache_mb | wall time | peak memory | detect stage | spikes | units |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB "
            f"| {r['timings_s']['detect']:.1f} s | "
            f"{r['num_spikes']:,} | {r['num_units']} |"
        )
    same = off["num_spikes"] == on["num_spikes"] and off["num_units"] == on["num_units"]
    lines += [
        "",
        f"- wall time with / without: {on['wall_s'] / off['wall_s']:.2f}; "
        f"peak memory +{on['peak_rss_mb'] - off['peak_rss_mb']:.0f} MB "
        "(bounded by trace_cache_mb, whatever the duration); "
        f"same spikes and units: {'yes' if same else 'NO'}",
    ]
    write_section("trace_cache", "\n".join(lines))


if __name__ == "__main__":
    main()
