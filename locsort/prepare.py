"""Stage 1: a recording made ready for every later stage: preprocessed (lazily), its noise
measured, its channel neighbourhoods built, its detection signal and amplitude reading chosen.
Nothing here changes after ``prepare`` returns; the fitted models travel separately
(``locsort.models``)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from .detect import fit_matched_filter, peaks_in_slices
from .errors import UsageError
from .io import check_recording
from .motion import MOTION_MODES
from .motion import load as load_motion
from .neighbourhood import AmplitudeReader, Neighbourhood, fit_amplitude_basis, gather_windows
from .params import Params, resolve_device
from .preprocess import (
    band_pass,
    find_bad_channels,
    noise_correlations,
    noise_levels,
    noise_slices,
    reference_skipped,
    referenced,
    referenced_slices,
)
from .scan import SampleCounts, Scanner, TraceCache

DETECT_METHODS = ("matched", "peak")


class Timer(dict):
    """Wall time per stage, in seconds, in the order the stages ran."""

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Prepared:
    """A recording made ready for every stage.

    recording : the preprocessed recording (lazy, SpikeInterface)
    noise : (C,) noise level per channel, µV (MAD-based SD)
    neighbourhood : fixed-shape channel neighbourhoods (neighbourhood.Neighbourhood)
    matched_filter : detect.MatchedFilter, or None: detection on the traces themselves
    detection : how spikes are detected, in words (run.json)
    amplitudes : how channel amplitudes are read before any denoiser is fitted
    noise_covariance : (C, C) µV² across channels; noise_autocorrelation : (T,) in time, 1 at 0
    bad_channels : channel id -> why it was interpolated
    trace_cache : the training sample's chunks, kept for the main pass (params.trace_cache_mb)
    notes : what the user should know about how the probe was read (run.json, the summary)
    registered : the traces were interpolated to undo a motion estimate (a unit's size on one
        channel still varies with the probe's position)
    """

    recording: object
    params: Params
    noise: np.ndarray
    neighbourhood: Neighbourhood
    timer: Timer = field(default_factory=Timer)
    matched_filter: object = None
    detection: str = ""
    amplitudes: AmplitudeReader | None = None
    noise_covariance: np.ndarray | None = None
    noise_autocorrelation: np.ndarray | None = None
    bad_channels: dict = field(default_factory=dict)
    trace_cache: TraceCache | None = None
    notes: list = field(default_factory=list)
    registered: bool = False

    def scanner(
        self, peaks=None, amplitudes: AmplitudeReader | None = None, last_pass: bool = False
    ) -> Scanner:
        """A scanner of the recording reading amplitudes with ``amplitudes`` (default: without a
        denoiser); the main pass (``last_pass``) takes the chunks the training sample kept in
        ``trace_cache`` instead of reading them again."""
        return Scanner(
            self.recording,
            self.params,
            self.neighbourhood,
            self.noise,
            peaks,
            self.matched_filter,
            amplitudes or self.amplitudes,
            self.trace_cache,
            last_pass,
        )

    @property
    def counts(self) -> SampleCounts:
        return SampleCounts.from_params(self.params, self.recording.get_sampling_frequency())

    @property
    def denoise(self) -> bool:
        """Whether an amplitude denoiser can be fitted (constants.amplitude_denoise_min_gain)."""
        return (
            self.params.constants.amplitude_denoise_min_gain < 1
            and self.amplitudes.basis is not None
        )


def prepare(recording, params: Params | None = None, timer: Timer | None = None) -> Prepared:
    params = params or Params()
    timer = timer if timer is not None else Timer()
    constants = params.constants
    check_recording(recording)
    resolve_device(params.device)  # refuse --device cuda without a GPU before any work
    if constants.detect_method not in DETECT_METHODS:
        raise UsageError(f"unknown detect_method {constants.detect_method!r}: use matched or peak")
    if params.motion is not None and params.motion not in MOTION_MODES:
        load_motion(params.motion, recording)  # a saved motion that does not fit: fail now
    with timer.stage("preprocess"):
        filtered = band_pass(recording, params)
        slices = noise_slices(filtered, params)
        bad_channels = find_bad_channels(filtered, params, slices)
        processed = referenced(filtered, params, bad_channels)
        slices = referenced_slices(slices, filtered, params, bad_channels)
    return measured(processed, params, timer, bad_channels, slices)


def measured(
    processed, params: Params, timer: Timer, bad_channels: dict, slices: list | None = None
) -> Prepared:
    """The preprocessed recording ``processed`` with everything measured on its traces: noise,
    noise correlations, neighbourhoods, the detection filter and the amplitude basis
    (``slices``: its noise slices, read here when not given)."""
    constants = params.constants
    with timer.stage("preprocess"):
        slices = slices if slices is not None else noise_slices(processed, params)
        noise = noise_levels(processed, params, slices)
        counts = SampleCounts.from_params(params, processed.get_sampling_frequency())
        covariance, autocorrelation = noise_correlations(
            slices, noise, counts.before + counts.after
        )
        neighbourhood = Neighbourhood.from_recording(
            processed, constants.neighbourhood_channels, constants.shank_gap_um
        )
        notes = [reference_skipped(processed.get_num_channels(), params), *neighbourhood.notes]
        matched_filter = None
        detection = f"negative peaks beyond {params.detect_threshold:g} noise SDs"
        neighbours = neighbourhood.channels_within(constants.detect_radius_um)
        if constants.detect_method == "matched":
            # its prototype from spikes 1 SD above threshold: clear shapes
            matched_filter = fit_matched_filter(
                slices,
                noise,
                neighbours,
                params.detect_threshold + 1.0,
                counts.sweep,
                counts.prototype_before,
                counts.prototype_after,
            )
            detection = (
                "matched filter (the recording's mean spike shape) beyond "
                f"{params.detect_threshold:g} SDs"
                if matched_filter is not None
                else detection + " (too few large spikes in the noise slices to learn a spike "
                "shape for the matched filter)"
            )
        basis = None
        if constants.amplitude_components > 0:
            # the basis from every spike past the threshold: far channels of small spikes too
            snippets = [
                gather_windows(
                    traces, rows, neighbourhood.index[channels], counts.before, counts.after
                )
                for traces, rows, channels in peaks_in_slices(
                    slices,
                    noise,
                    neighbours,
                    params.detect_threshold,
                    counts.sweep,
                    counts.before,
                    counts.after,
                )
            ]
            if snippets:
                basis = fit_amplitude_basis(
                    np.concatenate(snippets),
                    counts.amp_half,
                    counts.before,
                    constants.amplitude_components,
                )
        amplitudes = AmplitudeReader(counts.before, counts.after, counts.amp_half, basis)
    cache = (
        TraceCache(int(params.trace_cache_mb * 2**20))
        if params.trace_cache_mb is not None
        else None
    )
    return Prepared(
        processed,
        params,
        noise,
        neighbourhood,
        timer,
        matched_filter,
        detection,
        amplitudes,
        covariance,
        autocorrelation,
        bad_channels,
        cache,
        [note for note in notes if note],
    )
