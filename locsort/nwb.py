"""Export: the units into an NWB file (pynwb), for archives and for DANDI.

The file holds the probe's electrodes table (one electrode group per shank, positions in µm),
and the units table: spike times (s), the electrodes of each unit's main channel, its mean
waveform on every channel (V, at the recording's rate) and one column per ``units.tsv``
column (``locsort.curate.UNIT_COLUMNS``). The table's ``resolution`` is one sample, so
SpikeInterface's ``read_nwb_sorting`` finds the sampling rate. Segments are laid end to end
on the file's one clock.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .errors import LocsortError, UsageError
from .io import NO_SPACE, check_output_folder


def check_nwb_path(path: str | Path, overwrite: bool) -> Path:
    """The NWB file to write, refused as an output folder is: an existing file without
    ``overwrite``, a location that cannot be written; and a name without .nwb or a folder."""
    path = Path(path).absolute()
    if path.is_dir():
        raise UsageError(f"{path} is a folder; --nwb takes the path of a file")
    if path.suffix.lower() != ".nwb":
        raise UsageError(f"the NWB file's name must end in .nwb: {path}")
    if path.exists() and not overwrite:
        raise UsageError(f"NWB file {path} already exists; pass --overwrite to replace it")
    return check_output_folder(path, overwrite=True)  # only whether its folder can be written


def write_nwb(
    path: Path,
    *,
    recording,
    sorting,
    units,
    analyzer,
    spikes,
    description: str,
    shanks: np.ndarray | None = None,
):
    """Write the units to ``path`` (through a temporary file beside it, renamed when
    complete). ``units``: the table of ``curate.units_table``; ``analyzer``: the run's
    SortingAnalyzer (mean waveforms; None without units); ``shanks``: each channel's shank as
    the sort read the probe (neighbourhood.shank_ids)."""
    from hdmf.common import VectorData
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.misc import Units

    fs = float(recording.get_sampling_frequency())
    nwbfile = NWBFile(
        session_description=description,
        identifier=str(uuid.uuid4()),
        session_start_time=datetime.datetime.now(datetime.timezone.utc),
    )
    _electrodes(nwbfile, recording, shanks)
    columns = [  # an empty column has no type to write: a table without units has none
        VectorData(name=name, description=meaning, data=[])
        for name, meaning in _columns().items()
        if len(units)
    ]
    nwbfile.units = Units(
        name="units",
        description="units sorted by locsort; quality labels and metrics as in units.tsv",
        resolution=1.0 / fs,
        waveform_rate=fs,
        waveform_unit="volts",
        electrode_table=nwbfile.electrodes,
        columns=columns,
    )
    offsets = np.concatenate(
        [[0.0], np.cumsum([recording.get_duration(s) for s in range(recording.get_num_segments())])]
    )
    assigned = spikes[spikes["unit_index"] >= 0]
    times = assigned["sample_index"] / fs + offsets[assigned["segment_index"]]
    templates = (
        np.asarray(analyzer.get_extension("templates").get_data(operator="average"), float)
        if len(units)
        else None
    )
    channel_of = dict(zip(analyzer.unit_ids, analyzer.main_channel_indices)) if len(units) else {}
    for i, row in enumerate(units.itertuples(index=False)):
        mine = np.sort(times[assigned["unit_index"] == row.unit_id])
        nwbfile.add_unit(
            id=int(row.unit_id),
            spike_times=mine,
            electrodes=[int(channel_of[row.unit_id])],
            waveform_mean=templates[i] * 1e-6,  # µV to V
            **{name: _value(getattr(row, name)) for name in _columns()},
        )
    _write_atomic(path, nwbfile, NWBHDF5IO)


def _columns() -> dict:
    from .curate import UNIT_COLUMNS

    return {name: meaning for name, meaning in UNIT_COLUMNS.items() if name != "unit_id"}


def _value(value):
    return str(value) if isinstance(value, str) else float(value)


def _electrodes(nwbfile, recording, shanks: np.ndarray | None = None) -> None:
    """The electrodes table (one row per channel, in the recording's order) and one electrode
    group per shank: the recording's channel groups, or ``shanks`` (the sort's, per channel)
    where the probe names fewer shanks than the sort found at the gaps between its columns."""
    device = nwbfile.create_device(name="probe", description="the recording's probe")
    locations = np.asarray(recording.get_channel_locations(), float)
    groups = recording.get_channel_groups()
    groups = np.zeros(len(locations), int) if groups is None else np.asarray(groups)
    inferred = shanks is not None and len(np.unique(shanks)) > len(np.unique(groups))
    if inferred:
        groups = np.asarray(shanks)
    by_group = {
        group: nwbfile.create_electrode_group(
            name=f"shank{group}",
            description=f"contacts of shank {group}"
            + (
                " (the probe names no shanks: found at a gap between contact columns)"
                if inferred
                else ""
            ),
            location="unknown",
            device=device,
        )
        for group in dict.fromkeys(groups.tolist())
    }
    nwbfile.add_electrode_column(name="channel_name", description="the recording's channel id")
    for channel, (xy, group) in enumerate(zip(locations, groups.tolist())):
        nwbfile.add_electrode(
            group=by_group[group],
            location="unknown",
            rel_x=float(xy[0]),
            rel_y=float(xy[1]),
            channel_name=str(recording.channel_ids[channel]),
        )


def _write_atomic(path: Path, nwbfile, io_class) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".nwb", dir=path.parent)
    os.close(handle)
    try:
        with io_class(tmp, "w") as io:
            io.write(nwbfile)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in NO_SPACE:
            raise LocsortError(
                f"no space left to write {path} ({exc.strerror}); nothing was written there"
            ) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
