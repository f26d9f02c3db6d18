"""Stage 5: the neural sorter trained on the training sample, from locsort's own initial
clustering or from a user's labels, and its units' peeling templates.

With a user's labels limited to the first K spikes of each unit (few labels) the training
is one fixed recipe (docs/design-decisions.md, § Few labels): the backbone is first adapted to
the recording on locsort's own clustering of a sample of the whole recording; an ensemble of
networks with synthetic positives learns the K labels; that ensemble labels the sample, and one
network trains again from scratch on both (self-training)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import LocsortError
from ..params import PRETRAINED, Params, resolve_device
from .initial import initial_units
from .neural import NeuralSorter, Windows, load_backbone
from .peel import Templates
from .postprocess import assign_units
from .pretrained import BACKBONE_PATH

if TYPE_CHECKING:
    from ..prepare import Prepared
    from ..sample import TrainingSample


def configured_backbone(params: Params):
    """The backbone to fine-tune (``neural_backbone``): the shipped one, one from a file, or
    None (from scratch)."""
    choice = params.neural_backbone
    if choice is None:
        return None
    path = BACKBONE_PATH if choice == PRETRAINED else Path(choice)
    if choice == PRETRAINED and not path.exists():
        raise LocsortError(
            f"the pretrained backbone is missing from the package ({path}); "
            "re-install locsort or run scripts/pretrain_backbone.py"
        )
    return load_backbone(path)


def train_network(
    prep: Prepared,
    sample: TrainingSample,
    localizer,
    basis,
    label_source: str,
    notes: list,
    backbone,
    few_labels: bool = False,
):
    """(NeuralSorter, peeling Templates) trained on the sample, fine-tuning ``backbone`` (None:
    from scratch), or (None, None) when there is nothing to learn (then the caller clusters every
    spike, and ``notes`` says why). ``label_source``: "clustering" (locsort's own initial
    clustering of the sample) or "labels" (the sample's ``targets`` and ``mask``)."""
    constants = prep.params.constants
    if label_source == "clustering":
        location = localizer.transform(sample.observations, prep.neighbourhood)
        units, copies = initial_units(prep, sample, location, basis)
        num_units = int(units.max()) + 1 if len(units) and units.max() >= 0 else 0
        if num_units == 0:
            notes.append(
                "the clustering of the training sample found no units, so the neural "
                "sorter was not trained"
            )
            return None, None
        targets, mask = unit_targets(units, num_units)
        mask[copies] = True  # a late copy is a known negative of every unit: learnt as such
    else:
        targets, mask = sample.targets, sample.mask
        units = labelled_units(sample)
    labelled = int(mask.any(axis=1).sum())
    if labelled < constants.min_training_spikes:
        notes.append(
            f"only {labelled} labelled spikes to train the neural sorter on (at least "
            f"{constants.min_training_spikes} needed)"
            + (": every spike was clustered instead" if label_source == "clustering" else "")
        )
        if label_source != "clustering":
            raise LocsortError(
                notes[-1] + "; give labels covering more of the recording or a larger K"
            )
        return None, None
    with prep.timer.stage("train neural"):
        sorter = new_sorter(prep.params, few_labels).fit(
            sample.windows, targets, mask, backbone=backbone, progress=False
        )
        if label_source != "clustering":
            units = with_network_units(prep, sample, sorter, units)
        templates = Templates.fit(
            sample.snippets,
            sample.peaks["channel_index"],
            units,
            targets.shape[1],
            sample.footprints,
        )
    return sorter, templates


def unit_targets(units: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask), each (n, U), for training on ``units`` (-1: unknown, masked for every
    unit)."""
    targets = np.zeros((len(units), num_units), np.float32)
    targets[np.flatnonzero(units >= 0), units[units >= 0]] = 1.0
    return targets, np.repeat((units >= 0)[:, None], num_units, axis=1)


def labelled_units(sample: TrainingSample) -> np.ndarray:
    """(n,) the labelled unit of each spike of a sample read with labels, -1: none."""
    known = sample.targets * sample.mask
    return np.where(known.max(axis=1) > 0, known.argmax(axis=1), -1)


def new_sorter(params: Params, few_labels: bool) -> NeuralSorter:
    """An untrained NeuralSorter; with ``few_labels`` an ensemble trained with synthetic
    positives (constants.few_label_ensemble, few_label_synthetic_positives)."""
    constants = params.constants
    return NeuralSorter(
        epochs=constants.neural_epochs,
        lr=constants.neural_lr,
        batch_size=constants.neural_batch_size,
        patience=constants.neural_patience,
        frozen_epochs=constants.neural_frozen_epochs,
        device=resolve_device(params.device),
        seed=params.seed,
        ensemble=constants.few_label_ensemble if few_labels else 1,
        synthetic_positives=constants.few_label_synthetic_positives if few_labels else 0,
    )


def with_network_units(
    prep: Prepared, sample: TrainingSample, sorter, units: np.ndarray
) -> np.ndarray:
    """``units`` (-1: unlabelled) with the unlabelled spikes of the sample given the unit the
    trained network assigns them, so that peeling templates average all of a unit's sample
    spikes: a user's labels may be only the first K spikes of each unit, and K spikes make a
    noisy template."""
    proba = sorter.predict_proba(sample.windows)
    assigned = np.full(len(units), -1, np.int64)
    segments = sample.peaks["segment_index"]
    for segment in np.unique(segments):
        rows = np.flatnonzero(segments == segment)
        assigned[rows], _ = assign_units(
            sample.peaks["sample_index"][rows],
            proba[torch.as_tensor(rows, device=proba.device)],
            prep.params.constants.neural_threshold,
            prep.counts.refractory,
        )
    return np.where(units >= 0, units, assigned)


def adapted_backbone(prep: Prepared, unlabelled: TrainingSample, localizer, basis, notes: list):
    """The backbone of a network trained, as the default sort trains it, on locsort's own
    clustering of ``unlabelled`` (a sample of the whole recording; no labels used), or the
    configured backbone when the clustering finds no units.

    With K labels per unit the few-label networks must learn what tells this recording's units
    apart from K spikes each; a backbone fitted to a pretraining simulator does not separate this
    recording's similar waveforms. A clustering of thousands of spikes, with its own errors,
    still shows the backbone the recording's waveforms, channels and noise."""
    found, configured = [], configured_backbone(prep.params)  # fit() trains a copy
    sorter, _ = train_network(prep, unlabelled, localizer, basis, "clustering", found, configured)
    if sorter is None:
        notes.append("the backbone was not adapted to this recording (" + "; ".join(found) + ")")
        return configured
    notes.append(
        f"backbone adapted to this recording: trained on locsort's own clustering of "
        f"{sorter.history['train_windows']} spikes into {sorter.num_units} units before "
        "the labels"
    )
    return getattr(sorter.net, "members", [sorter.net])[0].backbone  # an ensemble's first member


def self_trained(
    prep: Prepared, labelled: TrainingSample, unlabelled: TrainingSample, sorter, labelled_end: int
):
    """(sorter, peeling templates) trained again on ``labelled`` (the user's labels) plus
    ``unlabelled`` (a sample of the whole recording) labelled by ``sorter``.

    A network fitted to K spikes per unit has seen each unit in K noise draws, on the one or two
    centre channels those spikes had, and in the first seconds of the recording only; its own
    assignments over the whole recording show it the rest. The second network is trained as on
    locsort's own clustering (one member, no synthetic spikes; candidates the first rejects are
    unknown, not negatives), from scratch: with thousands of labels a backbone pretrained on
    another probe type only holds it back."""
    # the labelled stretch is in ``labelled`` already, with the user's labels
    rest = unlabelled.subset(np.flatnonzero(unlabelled.times(prep.recording) >= labelled_end))
    num_units, no_units = labelled.targets.shape[1], np.full(len(rest.peaks), -1, np.int64)
    targets, mask = unit_targets(with_network_units(prep, rest, sorter, no_units), num_units)
    with prep.timer.stage("train neural"):
        sorter = new_sorter(prep.params, few_labels=False).fit(
            Windows.concatenate([labelled.windows, rest.windows]),
            np.concatenate([labelled.targets, targets]),
            np.concatenate([labelled.mask, mask]),
            backbone=None,
            progress=False,
        )
        units = np.concatenate(
            [
                with_network_units(prep, labelled, sorter, labelled_units(labelled)),
                with_network_units(prep, rest, sorter, no_units),
            ]
        )
        templates = Templates.fit(
            np.concatenate([labelled.snippets, rest.snippets]),
            np.concatenate([labelled.peaks["channel_index"], rest.peaks["channel_index"]]),
            units,
            num_units,
            labelled.footprints,
        )
    return sorter, templates
