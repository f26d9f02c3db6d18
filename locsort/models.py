"""What the training stages fit and the main pass uses, and how it is kept: weights as
safetensors, the rest as JSON and NPY (nothing pickled), so that a resumed run reads back
exactly what an uninterrupted one used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import write_atomic
from .localize import make_localizer
from .localize.amortized import AmortizedLocalizer
from .localize.baseline import CenterOfMass
from .motion import MotionInfo
from .neighbourhood import AmplitudeReader
from .params import resolve_device
from .prepare import Prepared
from .sort.neural import NeuralSorter
from .sort.peel import Templates


@dataclass
class Models:
    """The fitted models, and what to tell the user about them.

    localizer : the fitted localizer (localize/*)
    basis : (T, P) temporal PCs of centre-channel waveforms
    neural : the trained NeuralSorter (None: every spike is clustered instead)
    notes : what the user should know about the training
    label_source : "clustering", "labels" or "" (no neural sorter asked for)
    templates : peel.Templates of the neural sorter's units
    amplitudes : how amplitudes are read (with the fitted denoiser, if any)
    motion : the SpikeInterface Motion the recording was registered with (None: not corrected)
    motion_info : motion.MotionInfo, what the run says about motion
    """

    localizer: object
    basis: np.ndarray | None = None
    neural: NeuralSorter | None = None
    notes: list = field(default_factory=list)
    label_source: str = ""
    templates: Templates | None = None
    amplitudes: AmplitudeReader | None = None
    motion: object = None
    motion_info: MotionInfo = field(default_factory=lambda: MotionInfo(None))

    def save(self, folder: Path) -> None:
        """Every model in ``folder``; state.json last (its presence marks a complete save)."""
        localizer = self.localizer
        state = {
            "notes": self.notes,
            "label_source": self.label_source,
            "localizer": {
                "kind": type(localizer).__name__,
                "fallback_reason": getattr(localizer, "fallback_reason", ""),
                "history": getattr(localizer, "history", None),
            },
            "neural_history": self.neural.history if self.neural is not None else None,
            "motion": self.motion_info.asdict(),
        }
        if self.motion is not None:
            self.motion.save(folder / "motion", overwrite=True)
        if getattr(localizer, "net", None) is not None:
            localizer.save(folder / "encoder.safetensors")
        if self.neural is not None:
            self.neural.save(folder / "neural_sorter.safetensors")
        if self.basis is not None:
            write_atomic(folder / "basis.npy", lambda f: np.save(f, self.basis))
        if self.amplitudes is not None and self.amplitudes.components is not None:
            write_atomic(
                folder / "amplitude_denoiser.npz",
                lambda f: np.savez(
                    f, components=self.amplitudes.components, gains=self.amplitudes.gains
                ),
            )
        if self.templates is not None:
            write_atomic(
                folder / "templates.npz",
                lambda f: np.savez(
                    f, waveforms=self.templates.waveforms, channels=self.templates.channels
                ),
            )
        write_atomic(
            folder / "state.json",
            lambda f: f.write(json.dumps(state, default=json_default).encode()),
        )

    @classmethod
    def load(cls, folder: Path, prep: Prepared) -> Models:
        """The models saved in ``folder``, made ready for ``prep``'s recording."""
        params = prep.params
        state = json.loads((folder / "state.json").read_text())
        device = resolve_device(params.device)
        if (folder / "encoder.safetensors").exists():
            localizer = AmortizedLocalizer.load(folder / "encoder.safetensors", device=device)
            localizer.use_recording(prep.neighbourhood, prep.noise)
        else:  # centre of mass, chosen or fallen back to: no weights
            localizer = make_localizer(params.constants.localization_method, params)
            if state["localizer"]["fallback_reason"]:
                localizer.fallback = CenterOfMass(params.constants.com_channels)
                localizer.fallback_reason = state["localizer"]["fallback_reason"]
        if state["localizer"]["history"] is not None:
            localizer.history = state["localizer"]["history"]
        neural = None
        if (folder / "neural_sorter.safetensors").exists():
            neural = NeuralSorter.load(folder / "neural_sorter.safetensors", device=device)
            neural.history = state["neural_history"]
        basis = (
            np.load(folder / "basis.npy", allow_pickle=False)
            if (folder / "basis.npy").exists()
            else None
        )
        amplitudes = prep.amplitudes  # the main pass reads amplitudes as the models learnt them
        if (folder / "amplitude_denoiser.npz").exists():
            with np.load(folder / "amplitude_denoiser.npz", allow_pickle=False) as saved:
                amplitudes = amplitudes.with_denoiser(saved["components"], saved["gains"])
        templates = None
        if (folder / "templates.npz").exists():
            with np.load(folder / "templates.npz", allow_pickle=False) as saved:
                templates = Templates(saved["waveforms"], saved["channels"])
        return cls(
            localizer,
            basis,
            neural,
            state["notes"],
            state["label_source"],
            templates,
            amplitudes,
            cls.saved_motion(folder),
            MotionInfo(**state["motion"]),
        )

    @staticmethod
    def saved_motion(folder: Path):
        """The Motion kept in ``folder`` (None: the recording was not registered)."""
        from spikeinterface.core.motion import Motion

        return Motion.load(folder / "motion") if (folder / "motion").exists() else None


def json_default(value):
    """JSON for NumPy scalars and arrays and for paths (run.json, state.json)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value)}")
