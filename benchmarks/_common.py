"""Shared by the benchmark scripts: machine description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
DATA = ROOT / "benchmarks" / "data"
SHARED = ROOT.parent / "shared"
RESULTS = (
    ROOT / "benchmarks" / "results"
)  # raw results per benchmark and recording: a partial re-run updates its rows


def load_results(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(name: str, results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1, default=float))


def machine() -> str:
    import numpy
    import spikeinterface
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), no GPU used, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, "
        f"torch {torch.__version__}, spikeinterface {spikeinterface.__version__}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, keeping the others."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = (
        BENCHMARKS_MD.read_text()
        if BENCHMARKS_MD.exists()
        else "# Benchmarks\n\nEvery number here is written by a script under `benchmarks/`; "
        "re-run it to refresh its section.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])


def verdict(met: bool) -> str:
    """How BENCHMARKS.md states a target's outcome."""
    return "met" if met else "MISSED"


def command_lines(commands) -> list[str]:
    """The distinct commands that produced a section's rows (saved with each row), as markdown
    lines."""
    return [f"`{c}`" for c in sorted(set(commands) - {""})]
