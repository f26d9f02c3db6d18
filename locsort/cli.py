"""Command line: argument parsing and error messages only; the work is in locsort.pipeline.

Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted. Errors are one line
on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import LocsortError, UsageError
from .params import Params, param_type, public_fields


def _param_overrides(pairs: list[str]) -> dict:
    """--param name=value, typed by the parameter's type ("none" for None)."""
    by_name = {f.name: f for f in public_fields()}
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--param takes name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        if name not in by_name:
            raise UsageError(
                f"unknown parameter {name!r}; the parameters are "
                f"{', '.join(by_name)} (docs/parameters.md)"
            )
        kind = param_type(by_name[name])
        if value.strip().lower() == "none":
            out[name] = None
            continue
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[name] = value.lower() in ("true", "1", "yes")
            else:
                out[name] = kind(value)
        except ValueError:
            raise UsageError(f"--param {name} needs a {kind.__name__}, got {value!r}") from None
    return out


def _common(parser: argparse.ArgumentParser, default_out: str | None) -> None:
    parser.add_argument(
        "--out", required=default_out is None, default=default_out, help="output folder"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    parser.add_argument("--phy", action="store_true", help="also export a Phy folder (out/phy)")
    parser.add_argument(
        "--nwb",
        metavar="FILE.nwb",
        help="also write the units (spike times, positions, quality metrics, mean waveforms, "
        "electrodes) to this NWB file",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where torch runs (default: auto)"
    )
    parser.add_argument(
        "--motion",
        metavar="MODE_OR_FOLDER",
        help="drift correction: auto (default), rigid, nonrigid, none, or a saved "
        "SpikeInterface motion folder to reuse (e.g. an earlier run's out/motion)",
    )
    parser.add_argument(
        "--n-jobs",
        type=int,
        metavar="N",
        help="cores to use (default: all available to this process)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run the chunk work on a local Dask cluster of N processes",
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the chunk work on the Dask cluster at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786); workers must see the recording at the same path",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds to wait for --scheduler before giving up (default 20)",
    )
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="set a parameter (docs/parameters.md; 'none' for None): "
        + ", ".join(f.name for f in public_fields()),
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locsort", description="Bayesian spike localization and spike sorting"
    )
    parser.add_argument("--version", action="version", version=f"locsort {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="run the pipeline on a generated ground-truth recording and score it"
    )
    demo.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    demo.add_argument("--units", type=int, default=50, help="number of units (default 50)")
    demo.add_argument("--noise", type=float, default=5.0, help="noise level, µV (default 5)")
    demo.add_argument(
        "--channels",
        type=int,
        default=64,
        help="channels of the Neuropixels-like probe (default 64)",
    )
    demo.add_argument("--seed", type=int, default=0)
    _common(demo, default_out="locsort_demo")

    run = sub.add_parser("run", help="run the pipeline on a recording")
    run.add_argument(
        "recording",
        nargs="+",
        help="SpikeGLX / Open Ephys folder, .nwb, MEArec .h5, SpikeInterface folder or raw "
        "binary; several (or a quoted glob such as 'data/*.bin') are each sorted into their own "
        "folder under --out",
    )
    run.add_argument(
        "--format",
        choices=["spikeglx", "openephys", "nwb", "mearec", "si", "binary"],
        help="override format detection",
    )
    run.add_argument(
        "--probe", help="probe file (.json probeinterface, .prb, .csv): required for raw binary"
    )
    run.add_argument("--sampling-frequency", type=float, help="Hz (raw binary)")
    run.add_argument("--num-channels", type=int, help="channels (raw binary)")
    run.add_argument("--dtype", help="sample type, e.g. int16 (raw binary)")
    run.add_argument(
        "--labels",
        help="a sorting to train the neural sorter on (SpikeInterface folder or .npz): "
        "ground truth, another sorter's output, a curated sorting",
    )
    run.add_argument(
        "--labels-k",
        type=int,
        metavar="K",
        help="use only the first K labelled spikes of each unit",
    )
    _common(run, default_out=None)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _params(args) -> Params:
    overrides = _param_overrides(args.param)
    if args.device is not None:
        overrides["device"] = args.device
    if args.n_jobs is not None:
        overrides["n_jobs"] = args.n_jobs
    if args.motion is not None:
        overrides["motion"] = None if args.motion.strip().lower() == "none" else args.motion
    if getattr(args, "labels_k", None) is not None:
        if args.labels_k < 1:
            raise UsageError("--labels-k must be at least 1")
        overrides["label_max_spikes_per_unit"] = args.labels_k
    return Params().replace(**overrides)


def _print_summary(result, title: str) -> None:
    print(f"\n{title}")
    print(
        f"  spikes: {len(result.spikes)}   units: {len(result.sorting.unit_ids)}   "
        f"output: {result.out}"
    )
    quality = result.sorting.get_property("quality")
    if quality is not None and len(quality):
        counts = ", ".join(f"{list(quality).count(q)} {q}" for q in ("good", "mua", "noise"))
        print(f"  units by quality: {counts} (units.tsv)")
    if result.note:
        print(f"  note: {result.note}")
    if result.evaluation:
        loc = result.evaluation["localization"]
        srt = result.evaluation["sorting"]
        print(f"  localization error (detected spikes matched to true spikes, n={loc['n']}):")
        print(f"    median {loc['median_xy_um']:7.2f} µm   mean {loc['mean_xy_um']:7.2f} µm")
        print("  sorting accuracy (vs ground truth):")
        print(
            f"    mean {srt['mean_accuracy']:.3f}   units with accuracy >= 0.8: "
            f"{srt['well_detected']}/{srt['num_gt_units']}"
            f"   false-positive units: {srt['false_positive_units']}"
        )
    print("  wall time per stage (s):")
    for stage, seconds in result.timings.items():
        print(f"    {stage:<12}{seconds:8.2f}")
    print(f"    {'total':<12}{sum(result.timings.values()):8.2f}")


def _demo(args) -> int:
    from .pipeline import run
    from .simulate import generate_recording

    params = _params(args)
    if args.duration <= 0 or args.units <= 0 or args.channels <= 0:
        raise UsageError("--duration, --units and --channels must be positive")
    recording, ground_truth = generate_recording(
        duration=args.duration,
        num_units=args.units,
        noise_level=args.noise,
        seed=args.seed,
        num_channels=args.channels,
    )
    # the demo replaces its own default folder; an explicit --out follows the usual rule
    overwrite = args.overwrite or args.out == "locsort_demo"
    result = run(
        recording,
        args.out,
        params,
        ground_truth=ground_truth,
        overwrite=overwrite,
        phy=args.phy,
        nwb=args.nwb,
        progress=not args.quiet,
        source=f"demo ({args.duration:g} s, {args.units} units, noise {args.noise:g})",
        workers=args.workers,
        scheduler=args.scheduler,
        connect_timeout=args.connect_timeout,
    )
    _print_summary(
        result,
        f"locsort demo: {args.duration:g} s, {args.channels} channels, {args.units} units, "
        f"noise {args.noise:g} µV",
    )
    return 0


def _run(args) -> int:
    from .runners import open_runner

    params = _params(args)
    if args.labels_k is not None and not args.labels:
        raise UsageError("--labels-k needs --labels")
    paths, several = _expand_recordings(args.recording)
    if several and args.labels:
        raise UsageError(
            "--labels belong to one recording: sort several recordings without --labels"
        )
    if several and args.nwb:
        raise UsageError("--nwb names one file: sort several recordings without --nwb")
    with open_runner(args.workers, args.scheduler, args.connect_timeout, params) as runner:
        if not several:
            result = _run_one(args, params, paths[0], Path(args.out), runner)
            _print_summary(result, f"locsort run: {paths[0]}")
            return 0
        return _run_several(args, params, paths, runner)


def _run_one(args, params, path: str, out: Path, runner):
    from .io import open_labels, open_recording
    from .pipeline import run

    recording, ground_truth = open_recording(
        path,
        args.format,
        probe=args.probe,
        sampling_frequency=args.sampling_frequency,
        num_channels=args.num_channels,
        dtype=args.dtype,
    )
    labels = open_labels(args.labels) if args.labels else None
    return run(
        recording,
        out,
        params,
        ground_truth=ground_truth,
        overwrite=args.overwrite,
        phy=args.phy,
        nwb=args.nwb,
        progress=not args.quiet,
        source=str(path),
        labels=labels,
        runner=runner,
    )


def _run_several(args, params, paths: list[str], runner) -> int:
    """Each recording into OUT/<its name>, one after the other (the chunk work of each spread
    over the Dask workers, if any); a failure is reported and the others go on."""
    import time

    out = Path(args.out)
    names = _output_names(paths)
    rows = []
    for i, (path, name) in enumerate(zip(paths, names), 1):
        print(f"[{i}/{len(paths)}] {path} -> {out / name}", file=sys.stderr)
        start = time.perf_counter()
        try:
            result = _run_one(args, params, path, out / name, runner)
            rows.append(
                (
                    path,
                    "ok",
                    f"{len(result.spikes)} spikes, {len(result.sorting.unit_ids)} units "
                    f"-> {result.out}",
                    time.perf_counter() - start,
                )
            )
        except KeyboardInterrupt:
            raise
        except LocsortError as exc:
            rows.append((path, "failed", str(exc), time.perf_counter() - start))
        except Exception as exc:  # a bug on one recording must not stop the others
            if args.debug:
                raise
            rows.append(
                (
                    path,
                    "failed",
                    f"internal error: {type(exc).__name__}: {exc}",
                    time.perf_counter() - start,
                )
            )
        if rows[-1][1] == "failed":
            print(f"locsort: error: {path}: {rows[-1][2]}", file=sys.stderr)
    failed = sum(row[1] == "failed" for row in rows)
    print(f"\nlocsort run: {len(rows) - failed} of {len(rows)} recordings sorted")
    width = max(len(row[0]) for row in rows)
    for path, status, detail, seconds in rows:
        print(f"  {path:<{width}}  {status:<6}  {seconds:7.1f} s  {detail}")
    return 1 if failed else 0


def _expand_recordings(items: list[str]) -> tuple[list[str], bool]:
    """Paths from the command line, quoted globs expanded (sorted); and whether they are
    several recordings (then --out is the parent of one folder per recording)."""
    import glob

    paths, pattern = [], False
    for item in items:
        if not Path(item).exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UsageError(f"no recording matches {item}")
            paths += matches
            pattern = True
        else:
            paths.append(item)
    return paths, pattern or len(paths) > 1


def _output_names(paths: list[str]) -> list[str]:
    """One folder name per recording: its file or folder name without the format's suffix,
    made unique with -2, -3, ..."""
    names, seen = [], {}
    for path in paths:
        name = Path(path.rstrip("/")).name
        for suffix in (".ap.bin", ".lf.bin", ".bin", ".dat", ".raw", ".nwb", ".h5", ".hdf5"):
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"demo": _demo, "run": _run}[args.command](args)
    except LocsortError as exc:
        if args.debug:
            raise
        print(f"locsort: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("locsort: interrupted; no output folder was written", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"locsort: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            "locsort: error: out of memory; lower --param chunk_duration or trace_cache_mb",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        print(
            f"locsort: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
