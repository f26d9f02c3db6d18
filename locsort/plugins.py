"""SpikeInterface plug-ins, registered on ``import locsort``:

- ``run_sorter("locsort", recording, folder=...)``: locsort.run with any Params field as a
  sorter parameter (``get_default_sorter_params("locsort")`` lists them with their meaning);
  ``sorter_output/`` is the output folder of ``locsort run``, and the returned sorting carries
  each unit's ``location`` (and ``quality``) as unit properties. A GPU is used when present
  (``device="auto"``), the CPU otherwise.

- ``localize_peaks(recording, peaks, method="locsort", method_kwargs={...})`` and the
  SortingAnalyzer ``spike_locations`` extension (``method="locsort"``): x, y, z, alpha and the
  posterior SDs x_std, y_std, z_std.

The node trains the encoder on the peaks it is given (from its peak source) when it is built,
then localizes chunk by chunk inside SpikeInterface's pipeline. ``recording`` is expected to be
preprocessed already, as for SpikeInterface's own localizers.
"""

from __future__ import annotations

import numpy as np

from .params import Params, params_with
from .pipeline import fit_models, run
from .prepare import prepare
from .runners import thread_budget
from .scan import _features
from .spikes import check_peaks

LOCATION_DTYPE = [(name, "float32") for name in ("x", "y", "z", "alpha", "x_std", "y_std", "z_std")]


def _localize_node_class():
    from spikeinterface.sortingcomponents.peak_localization.base import LocalizeBase

    class LocalizeLocsort(LocalizeBase):
        """locsort's amortized Bayesian localization (see locsort.localize.amortized).

        method_kwargs: any locsort.params.Params field, and any locsort.constants.Constants
        field of the localizer (e.g. decay_law, jitter_uv, max_training_spikes)."""

        name = "locsort"
        params_doc = """
        params: dict
            Any locsort.params.Params field, e.g. encoder_path (a saved encoder to reuse),
            encoder_init ("pretrained" | None | a saved encoder to start training from), device
            ("auto" | "cpu" | "cuda"); and the localizer's constants (locsort.constants), e.g.
            decay_law ("exponential" | "monopole"), jitter_uv, max_training_spikes.
        """

        def __init__(self, recording, parents, return_output=True, radius_um=75.0, **params):
            LocalizeBase.__init__(
                self, recording, return_output=return_output, parents=parents, radius_um=radius_um
            )
            self._dtype = np.dtype(LOCATION_DTYPE)
            self._kwargs.update(params)
            # already preprocessed, localized by locsort; any constant of the localizer by name
            node_params = params_with(
                **{**params, "preprocess": False, "localization_method": "locsort"}
            )
            peaks = check_peaks(
                _source_peaks(parents[0]),
                recording.get_num_channels(),
                recording.get_num_segments(),
            )
            with thread_budget(node_params.n_jobs):
                self.prep = prepare(recording, node_params)
                models = fit_models(self.prep, peaks, progress=False)
            self.localizer, self.amplitudes = models.localizer, models.amplitudes

        def get_trace_margin(self):
            return 0

        def compute(self, traces, peaks, waveforms):
            counts = self.prep.counts
            out = np.zeros(len(peaks), dtype=self._dtype)
            if len(peaks) == 0:
                return out
            # our windows may reach further than SpikeInterface's margin: pad with zeros
            padded = np.pad(
                np.asarray(traces, dtype=np.float32), ((counts.margin, counts.margin), (0, 0))
            )
            rows = peaks["sample_index"].astype(np.int64) + counts.margin
            batch = _features(
                padded, rows, peaks, None, self.prep.neighbourhood, counts, self.amplitudes
            )
            location = self.localizer.transform(
                self.localizer.observe(batch, self.prep.neighbourhood), self.prep.neighbourhood
            )
            for name, _ in LOCATION_DTYPE:
                out[name] = location[name]
            return out

    return LocalizeLocsort


def _sorter_class():
    from spikeinterface.sorters.internal.si_based import ComponentsBasedSorter

    from . import __version__

    class LocsortSorter(ComponentsBasedSorter):
        """locsort: Bayesian spike localization, clustering and a neural sorter (locsort.sort)."""

        sorter_name = "locsort"
        gpu_capability = "nvidia-optional"
        requires_locations = False
        handle_multi_segment = True
        compatible_with_parallel = {"loky": True, "multiprocessing": True, "threading": False}
        _default_params = Params().public()
        _params_description = Params.descriptions()
        sorter_description = __doc__
        installation_mesg = "pip install locsort"

        @classmethod
        def get_sorter_version(cls):
            return __version__

        @classmethod
        def _run_from_folder(cls, sorter_output_folder, params, verbose):
            """``sorter_output/`` becomes the folder ``locsort run`` writes (spikes.npy with
            the posteriors, sorting/, analyzer/, units.tsv, run.json, report.html)."""
            recording = cls.load_recording_from_folder(
                sorter_output_folder.parent, with_warnings=False
            )
            run(
                recording,
                sorter_output_folder,
                params=dict(params),
                overwrite=True,  # the empty folder run_sorter made for it
                progress=verbose,
                source=f"run_sorter in {sorter_output_folder.parent}",
                command=["run_sorter", "locsort"],
            )

    return LocsortSorter


def _source_peaks(source) -> np.ndarray:
    """The peaks a SpikeInterface peak source will deliver (to train the encoder on)."""
    from .spikes import PEAK_DTYPE

    if getattr(source, "_peaks", None) is not None:  # PeakRetriever
        return source._peaks
    vector = getattr(source, "spike_vector", None)  # SpikeRetriever: each unit's main channel
    if vector is None:
        raise ValueError("locsort localization needs a PeakRetriever or SpikeRetriever peak source")
    peaks = np.zeros(len(vector), PEAK_DTYPE)
    peaks["sample_index"] = vector["sample_index"]
    peaks["segment_index"] = vector["segment_index"]
    peaks["channel_index"] = source.main_channel_indices[vector["unit_index"]]
    return peaks


def register() -> None:
    """Make method="locsort" known to SpikeInterface's localization and sorters (idempotent)."""
    from spikeinterface.sorters import sorterlist

    if "locsort" not in sorterlist.sorter_dict:
        sorter = _sorter_class()
        sorterlist.sorter_full_list.append(sorter)
        sorterlist.sorter_dict["locsort"] = sorter
    from spikeinterface.sortingcomponents.peak_localization import method_list

    node = _localize_node_class()
    method_list.peak_localization_methods["locsort"] = node
    try:  # spike_locations validates the method name against this dict
        from spikeinterface.postprocessing import unit_locations

        unit_locations.dtype_localize_by_method["locsort"] = LOCATION_DTYPE
    except ImportError:
        pass
