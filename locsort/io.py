"""Open any supported recording (through SpikeInterface readers) and write outputs atomically.

Formats and how a path is recognised when ``format`` is not given:

=========== ========================================================== ============================
format      path                                                       reader
=========== ========================================================== ============================
spikeglx    folder holding ``*.ap.meta``, or a ``*.ap.bin``/``.meta``  ``read_spikeglx``
openephys   folder holding ``structure.oebin`` or ``settings.xml``     ``read_openephys``
nwb         ``*.nwb``                                                  ``read_nwb_recording``
mearec      ``*.h5``/``*.hdf5`` (MEArec file)                          ``read_mearec``
si          folder saved by SpikeInterface (``si_folder.json``)        ``spikeinterface.load``
binary      ``*.bin``/``*.dat``/``*.raw`` + sampling rate, channels,   ``read_binary`` + probe file
            dtype and a probe file
=========== ========================================================== ============================
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import LocsortError, UsageError

FORMATS = ("spikeglx", "openephys", "nwb", "mearec", "si", "binary")
BINARY_SUFFIXES = (".bin", ".dat", ".raw")


def detect_format(path: Path) -> str:
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "si_folder.json").exists() or (path / "binary.json").exists():
            return "si"
        if any(path.glob("*.ap.meta")) or any(path.glob("*/*.ap.meta")):
            return "spikeglx"
        if any(path.glob("**/structure.oebin")) or any(path.glob("**/settings.xml")):
            return "openephys"
        raise UsageError(
            f"cannot tell the format of folder {path}: expected a SpikeGLX, Open Ephys or saved "
            f"SpikeInterface folder; pass --format ({', '.join(FORMATS)})"
        )
    if name.endswith(".nwb"):
        return "nwb"
    if name.endswith((".h5", ".hdf5")):
        return "mearec"
    if name.endswith((".ap.bin", ".lf.bin")) and path.with_suffix(".meta").exists():
        return "spikeglx"
    if name.endswith(BINARY_SUFFIXES):
        return "binary"
    raise UsageError(
        f"cannot tell the format of {path} from its name; pass --format ({', '.join(FORMATS)})"
    )


def read_probe(path: str | Path):
    """A probeinterface Probe from a .json (probeinterface), .prb or .csv file."""
    import probeinterface as pi

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"probe file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            group = pi.read_probeinterface(path)
        elif suffix == ".prb":
            group = pi.read_prb(path)
        elif suffix == ".csv":
            return _read_probe_csv(path)
        else:
            raise UsageError(
                f"unknown probe file type {suffix!r}: use a probeinterface .json, .prb or .csv"
            )
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read probe file {path}: {exc}") from exc
    if len(group.probes) == 1:
        return group.probes[0]
    return group


def _read_probe_csv(path: Path):
    """A probe from a CSV of contact positions, one row per channel in recording order.

    Columns ``x, y`` in µm, optionally ``shank`` (or ``shank_id``) and ``channel`` (or
    ``device_channel_index``: the recording channel each contact is wired to); a header row
    is optional (without it: x, y[, shank]). probeinterface has no CSV reader.
    """
    import csv

    import probeinterface as pi

    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise UsageError(f"probe file {path} is empty")
    try:
        [float(v) for v in rows[0][:2]]
        header = ["x", "y", "shank"][: len(rows[0])]
    except ValueError:
        header, rows = [h.strip().lower() for h in rows[0]], rows[1:]
    if "x" not in header or "y" not in header:
        raise UsageError(f"probe file {path} needs x and y columns")
    columns = {
        name: [r[i].strip() for r in rows] for i, name in enumerate(header) if i < len(rows[0])
    }
    try:
        positions = np.column_stack(
            [np.asarray(columns["x"], float), np.asarray(columns["y"], float)]
        )
    except ValueError as exc:
        raise UsageError(f"probe file {path}: x and y must be numbers ({exc})") from None
    probe = pi.Probe(ndim=2, si_units="um")
    shank = columns.get("shank", columns.get("shank_id"))
    probe.set_contacts(
        positions=positions,
        shapes="circle",
        shape_params={"radius": 6},
        shank_ids=np.asarray(shank).astype(str) if shank is not None else None,
    )
    wiring = columns.get("channel", columns.get("device_channel_index"))
    probe.set_device_channel_indices(
        np.asarray(wiring, int) if wiring is not None else np.arange(len(positions))
    )
    return probe


def _attach_probe(recording, probe, probe_path):
    import probeinterface as pi

    probes = probe.probes if isinstance(probe, pi.ProbeGroup) else [probe]
    num_contacts = sum(p.get_contact_count() for p in probes)
    if num_contacts != recording.get_num_channels():
        raise UsageError(
            f"the probe in {probe_path} has {num_contacts} contacts but the recording has "
            f"{recording.get_num_channels()} channels; "
            "use the probe file that matches this recording"
        )
    for p in probes:
        if p.device_channel_indices is None:
            if len(probes) > 1:
                raise UsageError(
                    f"probe file {probe_path} has several probes but no channel wiring "
                    "(device_channel_indices)"
                )
            p.set_device_channel_indices(np.arange(num_contacts))
    recording = recording.clone()  # the reader's recording stays as it was
    if len(probes) > 1:
        recording.set_probegroup(probe)
    else:
        recording.set_probe(probe)
    return recording


def _read_binary(path, sampling_frequency, num_channels, dtype, probe):
    from spikeinterface.core import read_binary

    missing = [
        flag
        for flag, value in (
            ("--sampling-frequency", sampling_frequency),
            ("--num-channels", num_channels),
            ("--dtype", dtype),
            ("--probe", probe),
        )
        if value is None
    ]
    if missing:
        raise UsageError(f"raw binary file {path} needs {', '.join(missing)}")
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise UsageError(f"unknown --dtype {dtype!r} (e.g. int16, float32)") from exc
    if num_channels <= 0 or sampling_frequency <= 0:
        raise UsageError("--num-channels and --sampling-frequency must be positive")
    frame_bytes = num_channels * dtype.itemsize
    size = path.stat().st_size
    if size % frame_bytes:
        raise UsageError(
            f"{path} is {size} bytes, not a multiple of {num_channels} channels "
            f"x {dtype.itemsize} bytes ({dtype}): check --num-channels and --dtype"
        )
    recording = read_binary(
        path, sampling_frequency=sampling_frequency, dtype=dtype, num_channels=num_channels
    )
    return recording


def open_recording(
    path: str | Path,
    format: str | None = None,
    *,
    probe: str | Path | None = None,
    sampling_frequency: float | None = None,
    num_channels: int | None = None,
    dtype: str | None = None,
):
    """A SpikeInterface recording with a probe attached, from any supported path.

    ``probe`` (a probe file) is required for raw binary and overrides the probe of other
    formats. Returns ``(recording, ground_truth)`` where ``ground_truth`` is a
    ``GroundTruth`` for MEArec files and ``None`` otherwise.
    """
    from . import simulate
    import spikeinterface.extractors as se
    from spikeinterface.core import load

    path = Path(path)
    if not path.exists():
        raise UsageError(f"recording not found: {path}")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    probe_obj = read_probe(probe) if probe is not None else None
    ground_truth = None
    try:
        if fmt == "binary":
            recording = _read_binary(path, sampling_frequency, num_channels, dtype, probe_obj)
        elif fmt == "spikeglx":
            folder = path if path.is_dir() else path.parent
            streams = se.get_neo_streams("spikeglx", folder)[0]
            ap = [s for s in streams if s.endswith(".ap")]
            if not ap:
                raise UsageError(f"no SpikeGLX AP stream (*.ap.bin) in {folder}")
            recording = se.read_spikeglx(folder, stream_id=ap[0])
        elif fmt == "openephys":
            recording = se.read_openephys(path)
        elif fmt == "nwb":
            recording = se.read_nwb_recording(path)
        elif fmt == "mearec":
            recording, ground_truth = simulate.read_mearec_ground_truth(path)
        else:
            recording = load(path)
    except (UsageError, LocsortError):
        raise
    except Exception as exc:
        raise UsageError(f"cannot read {path} as {fmt}: {exc}") from exc
    if probe_obj is not None:
        recording = _attach_probe(recording, probe_obj, probe)
    check_recording(recording, path)
    return recording, ground_truth


def open_labels(path: str | Path):
    """A sorting to train the neural sorter on: a SpikeInterface sorting folder (e.g. a
    locsort output's ``sorting/``, ``run_sorter``'s output) or an .npz sorting."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"labels not found: {path}")
    try:
        if path.suffix == ".npz":
            from spikeinterface.core import NpzSortingExtractor

            sorting = NpzSortingExtractor(path)
        else:
            from spikeinterface.core import load

            sorting = load(path)
    except Exception as exc:
        raise UsageError(
            f"cannot read labels from {path}: "
            f"not a SpikeInterface sorting folder or .npz file ({exc})"
        ) from None
    if not hasattr(sorting, "get_unit_spike_train"):
        raise UsageError(f"{path} holds a {type(sorting).__name__}, not a sorting")
    return sorting


def check_recording(recording, path="the recording"):
    """Refuse recordings locsort cannot process, with the reason and what to do."""
    if not recording.has_probe():
        raise UsageError(f"{path} has no probe (channel locations); pass a probe file with --probe")
    if recording.get_num_channels() == 0:
        raise UsageError(f"{path} has no channels")
    if sum(recording.get_num_samples(s) for s in range(recording.get_num_segments())) == 0:
        raise UsageError(f"{path} is empty (0 samples)")


def recording_files(recording) -> list[Path]:
    """The files and folders a (possibly preprocessed) SpikeInterface recording, or its
    description (``to_dict``), reads from."""
    found: list[Path] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file_path", "file_paths", "folder_path", "filename") and isinstance(
                    value, (str, Path, list)
                ):
                    found.extend(
                        Path(v)
                        for v in (value if isinstance(value, list) else [value])
                        if isinstance(v, (str, Path))
                    )
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    try:
        walk(recording if isinstance(recording, dict) else recording.to_dict(recursive=True))
    except Exception:  # an extractor that cannot describe itself: nothing to name
        pass
    return list(dict.fromkeys(found))


def describe_files(recording) -> str:
    files = recording_files(recording)
    return ", ".join(str(f) for f in files) if files else "the recording"


# --------------------------------------------------------------------------- output


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; refuse a location we cannot write to."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise UsageError(f"output folder {out} already exists; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:  # os.access says yes to root even on read-only mounts: really try
        os.rmdir(tempfile.mkdtemp(prefix=".locsort-write-check-", dir=parent))
    except OSError as exc:
        raise UsageError(
            f"cannot write to {parent} ({exc.strerror}): choose another output folder"
        ) from None
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    An interrupted run leaves only a hidden ``.NAME.tmp-*`` folder, never a folder named
    ``out`` that looks finished. An existing ``out`` is replaced only with ``overwrite``.
    """
    out = check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise LocsortError(f"cannot create a folder in {out.parent}: {exc.strerror}") from exc
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise LocsortError(
                f"no space left to write {out} ({exc.strerror}); nothing was written there. "
                "Free some space and run the same command again: the finished work is kept"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit


def write_atomic(path: str | Path, write) -> None:
    """``write(file)`` to ``path`` through a temporary name, flushed to disk before the
    rename: a file that exists is complete. A full disk is reported as such and leaves no
    partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_SPACE:
            raise LocsortError(
                f"no space left to write {path} ({exc.strerror}); free some space and run the same "
                "command again: finished work is kept"
            ) from exc
        raise


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, array))


def save_safetensors_atomic(path: str | Path, state_dict: dict, metadata: dict) -> None:
    """Torch weights as one safetensors file (no pickle), written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))
