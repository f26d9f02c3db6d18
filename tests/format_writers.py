"""Write tiny recordings in real acquisition formats, for tests of locsort's readers.

Each writer takes int16 traces of shape (num_samples, num_channels) and returns the path
a user would hand to SpikeInterface:

* ``write_spikeglx``  -> run folder for ``read_spikeglx(path, stream_id="imec0.ap")``
* ``write_openephys`` -> root folder for ``read_openephys(path)``
* ``write_nwb``       -> ``.nwb`` file for ``read_nwb_recording(path)``

NWB is written with pynwb. SpikeGLX and Open Ephys have no Python writer, so their
files are written by hand, with the fields that neo's ``SpikeGLXRawIO`` /
``OpenEphysBinaryRawIO`` and probeinterface's ``read_spikeglx`` parse.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

OPENEPHYS_BIT_VOLTS = 0.195  # µV per bit of an Intan headstage, as the Acquisition Board reports it
NWB_CONVERSION = 0.195e-6  # V per bit stored in ElectricalSeries.conversion


def _as_int16_2d(traces: np.ndarray) -> np.ndarray:
    traces = np.asarray(traces)
    if traces.ndim != 2 or traces.dtype != np.int16:
        raise ValueError(
            "traces must be a 2D int16 array (num_samples, num_channels), "
            f"got {traces.dtype} {traces.shape}"
        )
    return traces


def neuropixels1_locations(num_channels: int) -> np.ndarray:
    """Contact positions (µm) of readout channels 0..num_channels-1 of a Neuropixels 1.0 probe
    with bank 0 selected, in probeinterface's frame (what ``read_spikeglx`` attaches):
    staggered 2-column layout, 32 µm column pitch, 20 µm row pitch, even rows shifted by 16 µm."""
    c = np.arange(num_channels)
    row, col = c // 2, c % 2
    return np.column_stack([col * 32.0 + 16.0 * ((row + 1) % 2), row * 20.0])


def write_spikeglx(
    folder: Path, traces: np.ndarray, sampling_frequency: float, run_name: str = "locsort"
) -> Path:
    """Write a SpikeGLX run with one Neuropixels 1.0 (NP1000) AP stream; return the run folder.

    Layout (as SpikeGLX names it, the names are parsed by neo)::

        folder/<run>_g0/<run>_g0_imec0/<run>_g0_t0.imec0.ap.bin
                                       <run>_g0_t0.imec0.ap.meta

    The ``.bin`` is int16, sample-major, with ``num_channels + 1`` columns: the saved AP
    channels, then the sync word ``SY0`` (here a 1 Hz square wave on bit 6, like the imec
    sync input). neo exposes it as a separate ``"imec0.ap-SYNC"`` stream, so the
    ``"imec0.ap"`` stream has exactly ``num_channels`` channels.

    The probe acquires 384 channels, so ``imroTbl`` lists all 384 readout channels (bank 0,
    AP gain 500, LF gain 250); the file holds only the first ``num_channels`` of them, which
    is how SpikeGLX records a channel subset: ``snsSaveChanSubset=0:N-1,768`` (768 is the
    sync channel's acquisition index after 384 AP + 384 LF). probeinterface builds the probe
    from ``imDatPrb_pn`` + ``imroTbl`` and slices it with ``snsSaveChanSubset``; neo takes
    the per-channel gain from ``imroTbl`` (uV per bit = 0.6 / 512 / 500 * 1e6 = 2.34375).
    ``snsShankMap`` / ``snsGeomMap`` are written consistently for completeness, but the
    installed readers do not use them. Contact positions: ``neuropixels1_locations``.
    """
    traces = _as_int16_2d(traces)
    num_samples, num_channels = traces.shape
    if not 1 <= num_channels <= 384:
        raise ValueError("a Neuropixels 1.0 AP stream has at most 384 channels")

    run_folder = Path(folder) / f"{run_name}_g0"
    probe_folder = run_folder / f"{run_name}_g0_imec0"
    probe_folder.mkdir(parents=True, exist_ok=True)
    bin_file = probe_folder / f"{run_name}_g0_t0.imec0.ap.bin"

    t = np.arange(num_samples)
    sync = (((t // max(int(sampling_frequency / 2), 1)) % 2) * 64).astype(np.int16)
    data = np.column_stack([traces, sync]).astype("<i2")
    data.tofile(bin_file)

    n = num_channels
    row, col = np.arange(n) // 2, np.arange(n) % 2
    x_in_shank = (
        neuropixels1_locations(n)[:, 0] + 11
    )  # SpikeGLX measures x from the shank's left edge
    meta = {
        "acqApLfSy": "384,384,1",
        "appVersion": "20230815",
        "fileCreateTime": datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "fileName": bin_file.as_posix(),
        "fileSHA1": hashlib.sha1(data.tobytes()).hexdigest().upper(),
        "fileSizeBytes": data.nbytes,
        "fileTimeSecs": num_samples / sampling_frequency,
        "firstSample": 0,
        "gateMode": "Immediate",
        "imAiRangeMax": 0.6,
        "imAiRangeMin": -0.6,
        "imDatPrb_pn": "NP1000",
        "imDatPrb_port": 1,
        "imDatPrb_slot": 2,
        "imDatPrb_sn": 18005116811,
        "imDatPrb_type": 0,
        "imMaxInt": 512,
        "imSampRate": sampling_frequency,
        "nSavedChans": n + 1,
        "snsApLfSy": f"{n},0,1",
        "snsSaveChanSubset": f"0:{n - 1},768",
        "syncSourcePeriod": 1,
        "trigMode": "Immediate",
        "typeImEnabled": 1,
        "typeNiEnabled": 0,
        "typeThis": "imec",
        "~imroTbl": "(0,384)" + "".join(f"({c} 0 0 500 250 1)" for c in range(384)),
        "~snsChanMap": "(384,384,1)"
        + "".join(f"(AP{c};{c}:{c})" for c in range(n))
        + "(SY0;768:768)",
        "~snsGeomMap": "(NP1000,1,0,70)"
        + "".join(f"(0:{x:g}:{20 * r}:1)" for x, r in zip(x_in_shank, row)),
        "~snsShankMap": "(1,2,480)" + "".join(f"(0:{c}:{r}:1)" for c, r in zip(col, row)),
    }
    text = "".join(f"{key}={value}\n" for key, value in meta.items())
    bin_file.with_suffix(".meta").write_text(text)
    return run_folder


def write_openephys(folder: Path, traces: np.ndarray, sampling_frequency: float) -> Path:
    """Write an Open Ephys GUI (>= 0.6) binary-format recording; return its root folder.

    Layout::

        folder/Record Node 101/settings.xml
        folder/Record Node 101/experiment1/recording1/structure.oebin
        folder/Record Node 101/experiment1/recording1/continuous/Acquisition_Board-100.Rhythm Data/
            continuous.dat       int16, sample-major, num_channels columns
            sample_numbers.npy   int64 sample index (>= 0.6; t_start = first / rate = 0 here)
            timestamps.npy       float64 seconds

    It mimics an Acquisition Board (Intan) stream: channels CH1..CHn with
    ``bit_volts = 0.195`` µV, no SYNC and no ADC channels, so the only stream is
    ``"Record Node 101#Acquisition_Board-100.Rhythm Data"`` (stream_id ``"0"``).

    No probe is attached: SpikeInterface attaches one only when ``settings.xml`` holds a
    Neuropixels probe element (``<NP_PROBE>`` etc.); the minimal ``settings.xml`` written
    here has none, so callers must supply the geometry with a probe file.
    """
    traces = _as_int16_2d(traces)
    num_samples, num_channels = traces.shape
    node = Path(folder) / "Record Node 101"
    rec_folder = node / "experiment1" / "recording1"
    stream_folder_name = "Acquisition_Board-100.Rhythm Data"
    stream_folder = rec_folder / "continuous" / stream_folder_name
    stream_folder.mkdir(parents=True, exist_ok=True)

    traces.astype("<i2").tofile(stream_folder / "continuous.dat")
    sample_numbers = np.arange(num_samples, dtype=np.int64)
    np.save(stream_folder / "sample_numbers.npy", sample_numbers)
    np.save(stream_folder / "timestamps.npy", sample_numbers / float(sampling_frequency))

    channels = [
        {
            "channel_name": f"CH{i + 1}",
            "description": "Headstage data channel",
            "identifier": "genericdata.continuous",
            "history": "Acquisition Board -> Record Node",
            "bit_volts": OPENEPHYS_BIT_VOLTS,
            "units": "uV",
        }
        for i in range(num_channels)
    ]
    structure = {
        "GUI version": "0.6.7",
        "continuous": [
            {
                "folder_name": f"{stream_folder_name}/",
                "sample_rate": float(sampling_frequency),
                "source_processor_name": "Acquisition Board",
                "source_processor_id": 100,
                "stream_name": "Rhythm Data",
                "recorded_processor": "Record Node",
                "recorded_processor_id": 101,
                "num_channels": num_channels,
                "channels": channels,
            }
        ],
        "events": [],
        "spikes": [],
    }
    (rec_folder / "structure.oebin").write_text(json.dumps(structure, indent=2))
    (node / "settings.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<SETTINGS>\n'
        "  <INFO><VERSION>0.6.7</VERSION></INFO>\n"
        "  <SIGNALCHAIN>\n"
        f'    <PROCESSOR name="Acquisition Board" nodeId="100">'
        f'<STREAM name="Rhythm Data" sample_rate="{float(sampling_frequency)}" '
        f'channel_count="{num_channels}"/>'
        "</PROCESSOR>\n"
        '    <PROCESSOR name="Record Node" nodeId="101"/>\n'
        "  </SIGNALCHAIN>\n</SETTINGS>\n"
    )
    return Path(folder)


def write_nwb(
    path: Path, traces: np.ndarray, sampling_frequency: float, locations: np.ndarray
) -> Path:
    """Write an NWB file with pynwb; return its path.

    One Device, one ElectrodeGroup, an electrodes table with ``rel_x`` / ``rel_y`` (µm,
    position within the group: the columns SpikeInterface turns into channel locations)
    and ``channel_name`` (``"CH0"``.. : becomes the channel ids), and one ElectricalSeries
    ``acquisition/ElectricalSeries`` holding the int16 traces as-is, with
    ``conversion = 0.195e-6`` V per bit (SpikeInterface gain 0.195 µV) and ``rate``.
    """
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ecephys import ElectricalSeries

    traces = _as_int16_2d(traces)
    locations = np.asarray(locations, dtype=float)
    if locations.shape != (traces.shape[1], 2):
        raise ValueError(f"locations must have shape ({traces.shape[1]}, 2), got {locations.shape}")

    nwbfile = NWBFile(
        session_description="locsort test recording",
        identifier="locsort-test",
        session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc),
    )
    device = nwbfile.create_device(name="probe", description="test probe")
    group = nwbfile.create_electrode_group(
        name="0", description="shank 0", location="unknown", device=device
    )
    nwbfile.add_electrode_column(name="channel_name", description="channel name")
    for i, (x, y) in enumerate(locations):
        nwbfile.add_electrode(
            group=group, location="unknown", rel_x=float(x), rel_y=float(y), channel_name=f"CH{i}"
        )
    electrodes = nwbfile.create_electrode_table_region(
        region=list(range(len(locations))), description="all"
    )
    nwbfile.add_acquisition(
        ElectricalSeries(
            name="ElectricalSeries",
            data=traces,
            electrodes=electrodes,
            rate=float(sampling_frequency),
            starting_time=0.0,
            conversion=NWB_CONVERSION,
        )
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path
