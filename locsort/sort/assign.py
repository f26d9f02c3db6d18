"""Per-chunk assignment: the trained network gives each detected candidate a unit; with peeling
templates, candidates it rejects may be rescued by a template that fits them, assigned spikes
must stand out of the noise, and the chunk is searched again with the assigned spikes
subtracted (overlapping and faint spikes; sort/peel.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..scan import Scanner, SpikeBatch
from .neural import NeuralSorter, Windows
from .peel import SHIFTS, Significance, Templates, rescue, subtract, unclaimed, unexplained
from .peel import unfitted
from .postprocess import assign_units


@dataclass
class Assigner:
    """Units for one chunk's candidates. Picklable: Dask sends it to each worker once.

    neural : the trained NeuralSorter
    refractory : samples; one unit's candidates closer than this are one spike
    templates : peel.Templates of the units (None: no peeling, no rescue, no significance test)
    significance : peel.Significance of the templates (None: no test)
    """

    scanner: Scanner
    neural: NeuralSorter
    refractory: int
    templates: Templates | None = None
    significance: Significance | None = None

    def __call__(
        self, chunk, batch: SpikeBatch
    ) -> tuple[np.ndarray, SpikeBatch | None, np.ndarray, float]:
        """(units of ``batch``, the spikes found under them or None, their units, seconds spent
        detecting those)."""
        constants, counts = self.scanner.params.constants, self.scanner.counts
        proba = self.neural.predict_proba(
            Windows.from_batch(batch, self.scanner.neighbourhood, self.scanner.noise)
        )
        units, _ = assign_units(
            batch.peaks["sample_index"], proba, constants.neural_threshold, self.refractory
        )
        if self.templates is None or self.scanner.peaks is not None:
            return units, None, np.zeros(0, np.int64), 0.0
        units = self._significant(
            batch._traces,
            batch._rows,
            self._rescue(batch, proba, units),
            constants.neural_min_z,
            counts.template_shift,
        )
        hidden, hidden_units, detecting = self._peel(chunk, batch, units)
        return units, hidden, hidden_units, detecting

    def _rescue(self, batch: SpikeBatch, proba, units: np.ndarray) -> np.ndarray:
        """``units`` with the candidates the network rejected given to the unit whose template
        fits them, among its most probable units (peel.rescue: overlapping spikes)."""
        constants, counts = self.scanner.params.constants, self.scanner.counts
        if constants.neural_rescue_min_probability >= 1:
            return units
        return rescue(
            batch._traces,
            batch._rows,
            proba.cpu().numpy(),
            units,
            self.templates,
            counts.before,
            constants.neural_rescue_min_probability,
            constants.neural_rescue_min_fit,
            counts.before + counts.after,
        )

    def _significant(
        self, traces: np.ndarray, rows: np.ndarray, units: np.ndarray, min_z: float, max_shift: int
    ) -> np.ndarray:
        """``units`` with -1 where an assigned spike's match with its unit's prewhitened
        template in ``traces``, at its best within ``max_shift`` samples, is under ``min_z``
        noise SDs (peel.Significance): noise events the network gave to a faint unit."""
        if self.significance is None or min_z <= 0:
            return units
        tested = np.flatnonzero(units >= 0)
        tested = tested[self.templates.defined[units[tested]]]
        z = self.significance.z(
            traces,
            rows[tested],
            units[tested],
            self.templates.channels,
            self.scanner.counts.before,
            max_shift,
        )
        units = units.copy()
        units[tested[z < min_z]] = -1
        return units

    def _peel(
        self, chunk, batch: SpikeBatch, units: np.ndarray
    ) -> tuple[SpikeBatch, np.ndarray, float]:
        """The spikes found on the residual (under the assigned ones, and where the first pass
        found nothing), their units and the seconds spent detecting them."""
        constants, counts = self.scanner.params.constants, self.scanner.counts
        assigned = units >= 0
        residual, changed = subtract(
            batch._traces, batch._rows[assigned], units[assigned], self.templates, counts.before
        )
        detect_start = time.perf_counter()
        hidden = self.scanner.batch_in(
            residual, batch._first, chunk, threshold=constants.peel_detect_threshold
        )
        new = changed | unclaimed(
            changed.shape, batch._rows, batch.centre, self.scanner.detect_neighbours, counts.sweep
        )
        hidden = hidden.subset(np.flatnonzero(new[hidden._rows, hidden.centre]))
        detecting = time.perf_counter() - detect_start
        if len(hidden.centre) == 0:
            return hidden, np.zeros(0, np.int64), detecting
        found = hidden.peaks["sample_index"]
        proba = self.neural.predict_proba(
            Windows.from_batch(hidden, self.scanner.neighbourhood, self.scanner.noise)
        )
        hidden_units, _ = assign_units(
            found, proba, constants.neural_peel_threshold, self.refractory
        )
        hidden_units = unfitted(
            residual,
            hidden._rows,
            hidden_units,
            self.templates,
            counts.before,
            constants.neural_peel_min_fit,
        )
        hidden_units = self._significant(
            residual, hidden._rows, hidden_units, constants.neural_peel_min_z, max(SHIFTS)
        )
        return (
            hidden,
            unexplained(
                found,
                hidden_units,
                batch.peaks["sample_index"][assigned],
                units[assigned],
                counts.before + counts.after,
            ),
            detecting,
        )
