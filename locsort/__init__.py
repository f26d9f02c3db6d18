"""locsort: where each spike on a high-density probe came from, and which neuron fired it.

Public API (shared by the CLI, the SpikeInterface plug-ins and the tests)::

    peaks = locsort.detect(recording)                      # SpikeInterface peak dtype
    spikes = locsort.localize(recording, peaks=None)       # locsort.SPIKE_DTYPE records
    sorting = locsort.sort(recording)                      # spikeinterface BaseSorting
    result = locsort.run(recording, out="results")         # whole pipeline + output folder
"""

__version__ = "0.1.0"

from .errors import LocsortError, UsageError
from .io import open_recording
from .params import Params
from .pipeline import detect, localize, run, sort
from .spikes import SPIKE_DTYPE
from . import plugins as _plugins

_plugins.register()

__all__ = [
    "LocsortError",
    "Params",
    "SPIKE_DTYPE",
    "UsageError",
    "__version__",
    "detect",
    "localize",
    "open_recording",
    "run",
    "sort",
]
