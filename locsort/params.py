"""The parameters a user sets, each with its type, allowed values and one line of help.

``Params`` is a frozen dataclass validated when it is built: ``Params(detect_threshold=6)``,
``Params.from_dict(d)`` (unknown names are an error) or ``params.replace(...)``. ``None`` always
means off. ``asdict()`` is what ``run.json`` records, with every internal constant under
``constants`` (``locsort.constants``). ``docs/parameters.md`` is generated from this file
(``scripts/write_parameter_docs.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .constants import Constants
from .errors import UsageError

PRETRAINED = "pretrained"


def _param(
    default, help: str, *, choices=None, low=None, high=None, path: bool = False, other: str = ""
):
    """A field with its help line, allowed ``choices`` or range [``low``, ``high``], whether a
    file path is allowed besides the choices, or ``other`` values in words."""
    meta = {
        "help": help,
        "choices": choices,
        "low": low,
        "high": high,
        "path": path,
        "other": other,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Params:
    # --- preprocessing ---
    preprocess: bool = _param(True, "band-pass and common reference (False: data already filtered)")
    freq_min: float = _param(300.0, "Hz, high-pass edge of the band-pass filter", low=1.0)
    freq_max: float = _param(6000.0, "Hz, low-pass edge (capped below Nyquist)", low=1.0)
    common_reference: str | None = _param(
        "median",
        "noise shared by all channels removed by their median or average (None: off)",
        choices=("median", "average", None),
    )
    bad_channels: str | None = _param(
        "auto",
        '"auto" finds flat and very noisy channels, or comma-separated channel ids; they '
        "are interpolated from their neighbours (None: keep every channel)",
        choices=("auto", None),
        other="comma-separated channel ids",
    )
    # --- detection and chunking ---
    detect_threshold: float = _param(
        5.5, "spikes are detected this many noise SDs below zero", low=2.0, high=50.0
    )
    chunk_duration: float = _param(
        1.0, "s of traces per chunk: memory per chunk, independent of duration", low=0.05
    )
    trace_cache_mb: float | None = _param(
        512.0,
        "MB of the training sample's filtered traces kept for the main pass (None: off)",
        low=1.0,
    )
    # --- motion ---
    motion: str | None = _param(
        "auto",
        'probe motion (drift) corrected before sorting: "auto" (non-rigid where the probe is '
        'long enough, else rigid; skipped when the training sample shows no drift), "rigid", '
        '"nonrigid", a saved SpikeInterface motion folder, or None (off)',
        choices=("auto", "rigid", "nonrigid", None),
        path=True,
    )
    # --- outputs ---
    analyzer: bool = _param(
        True,
        "write analyzer/ (a SpikeInterface SortingAnalyzer with quality metrics) and units.tsv "
        "with a quality label per unit (False: skip them, faster)",
    )
    # --- execution ---
    n_jobs: int | None = _param(
        None, "cores to use: chunk threads, torch and BLAS together (None: all available)", low=1
    )
    device: str = _param(
        "auto", 'where torch runs ("auto": CUDA when present)', choices=("auto", "cpu", "cuda")
    )
    seed: int = _param(
        0, "every random choice (sampling, training, clustering) derives from it", low=0
    )
    # --- learned models ---
    encoder_init: str | None = _param(
        PRETRAINED,
        "the localization encoder's start: the shipped one for this probe type, a "
        "saved encoder (.safetensors), or None (from scratch)",
        choices=(PRETRAINED, None),
        path=True,
    )
    encoder_path: str | None = _param(
        None, "a saved encoder (.safetensors) used as it is instead of training one", path=True
    )
    neural_backbone: str | None = _param(
        PRETRAINED,
        "the neural sorter's backbone to fine-tune: shipped, a saved one "
        "(.safetensors), or None (from scratch)",
        choices=(PRETRAINED, None),
        path=True,
    )
    label_max_spikes_per_unit: int | None = _param(
        None, "with a user's labels: train on the first K spikes of each unit (None: all)", low=1
    )
    # --- internal (not listed in help; see locsort.constants) ---
    constants: Constants = field(default_factory=Constants, metadata={"internal": True})

    def __post_init__(self):
        if isinstance(self.constants, dict):
            object.__setattr__(self, "constants", Constants.from_dict(self.constants))
        for f in public_fields():
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        if self.freq_min >= self.freq_max:
            raise UsageError(
                f"freq_min ({self.freq_min:g} Hz) must be below freq_max ({self.freq_max:g} Hz)"
            )

    @classmethod
    def from_dict(cls, values: dict) -> Params:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(
                f"unknown parameter(s): {', '.join(unknown)}; the parameters are "
                f"{', '.join(f.name for f in public_fields())}"
            )
        return cls(**values)

    def replace(self, **changes) -> Params:
        return self.from_dict({**self.asdict(), **changes})

    def asdict(self) -> dict:
        return asdict(self)

    def public(self) -> dict:
        """The user's parameters alone, without the internal constants."""
        return {f.name: getattr(self, f.name) for f in public_fields()}

    @staticmethod
    def descriptions() -> dict:
        """{name: one line of help with the allowed values}: for --help and run_sorter."""
        return {f.name: f.metadata["help"] + _allowed(f) for f in public_fields()}


def params_with(**values) -> Params:
    """Params with each of ``values`` set, a parameter or an internal constant alike: for the
    benchmarks and tests, which run the real pipeline at other settings than a user's."""
    names = {f.name for f in fields(Constants)}
    constants = {k: v for k, v in values.items() if k in names}
    public = {k: v for k, v in values.items() if k not in names}
    return Params.from_dict({**public, "constants": Constants.from_dict(constants)})


def public_fields() -> list:
    return [f for f in fields(Params) if not f.metadata.get("internal")]


def param_type(f) -> type:
    """The type of a parameter's values besides None (bool, int, float or str)."""
    return {"bool": bool, "int": int, "float": float}.get(f.type.split(" ")[0], str)


def _allowed(f) -> str:
    meta, parts = f.metadata, []
    if meta["choices"] is not None:
        parts.append(", ".join("None" if c is None else repr(c) for c in meta["choices"]))
    if meta["path"]:
        parts.append("a file path")
    if meta["other"]:
        parts.append(meta["other"])
    if meta["low"] is not None or meta["high"] is not None:
        low = "-inf" if meta["low"] is None else f"{meta['low']:g}"
        high = "inf" if meta["high"] is None else f"{meta['high']:g}"
        parts.append(f"[{low}, {high}]")
    if "None" in f.type and (meta["choices"] is None or None not in meta["choices"]):
        parts.append("None")
    return (
        f" ({param_type(f).__name__}: {'; '.join(parts)})"
        if parts
        else f" ({param_type(f).__name__})"
    )


def _checked(f, value):
    """``value`` for field ``f`` converted where that is lossless (an int for a float, a Path for
    a str), or a UsageError saying what is allowed."""
    meta, kind = f.metadata, param_type(f)
    if value is None:
        if "None" in f.type:
            return None
        raise UsageError(f"{f.name} cannot be None{_allowed(f)}")
    if isinstance(value, Path) and kind is str:
        value = str(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        article = "an" if kind is int else "a"
        raise UsageError(f"{f.name} must be {article} {kind.__name__}, got {value!r}{_allowed(f)}")
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{f.name} must be finite, got {value!r}")
    if meta["low"] is not None and value < meta["low"]:
        raise UsageError(f"{f.name} must be at least {meta['low']:g}, got {value!r}")
    if meta["high"] is not None and value > meta["high"]:
        raise UsageError(f"{f.name} must be at most {meta['high']:g}, got {value!r}")
    if kind is str and value.strip().lower() == "none":
        raise UsageError(
            f"{f.name}: use None (--param {f.name}=none) for off, not the string {value!r}"
        )
    free = meta["path"] or meta["other"]
    if meta["choices"] is not None and value not in meta["choices"] and not free:
        raise UsageError(f"{f.name} cannot be {value!r}{_allowed(f)}")
    if kind is str and not value.strip():
        raise UsageError(f"{f.name} cannot be empty{_allowed(f)}")
    return value


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; an explicit 'cuda' without one is an
    error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto"
        )
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def markdown() -> str:
    """docs/parameters.md: every parameter with its default, allowed values and help."""
    lines = [
        "# Parameters",
        "",
        "Generated from `locsort/params.py` by `python scripts/write_parameter_docs.py`.",
        "",
        "Set them with `--param NAME=VALUE` (`none` for None) on the command line, "
        '`Params(NAME=VALUE)` in Python, or as `run_sorter("locsort", ..., NAME=VALUE)`.',
        "",
        "| parameter | default | meaning |",
        "|---|---|---|",
    ]
    for f in public_fields():
        lines.append(f"| `{f.name}` | `{f.default!r}` | {Params.descriptions()[f.name]} |")
    lines += [
        "",
        "Every other value the pipeline uses is an internal constant with its reason in "
        "`locsort/constants.py`; `run.json` records them all under `params.constants`.",
    ]
    return "\n".join(lines) + "\n"
