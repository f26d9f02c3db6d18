"""Stage 3: the localizer fitted on the training sample, and the sort's refinement of it on
amplitudes read with the fitted amplitude denoiser."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..neighbourhood import AmplitudeReader
from ..sample import fit_denoiser, observed_again

if TYPE_CHECKING:
    from ..prepare import Prepared
    from ..sample import TrainingSample


def fit_localizer(prep: Prepared, localizer, sample: TrainingSample, progress: bool):
    """``localizer`` trained on the sample or, for an encoder loaded from a file, adapted to this
    recording (probe geometry checked, noise levels replaced)."""
    if getattr(localizer, "net", None) is not None:
        return localizer.use_recording(prep.neighbourhood, prep.noise)
    return localizer.fit(
        sample.observations, prep.neighbourhood, prep.noise, prep.params, progress=progress
    )


def refined_localizer(
    prep: Prepared, localizer, sample: TrainingSample, progress: bool, runner=None
) -> tuple[object, AmplitudeReader]:
    """(localizer, amplitude reader) for the spikes a neural sort reports.

    A sort clusters on amplitudes read without the denoiser (denoised locations separate
    neighbouring units less well; docs/design-decisions.md, § Amplitudes); the locations it
    reports come from its localizer trained ``encoder_refine_epochs`` more on the sample's
    amplitudes read with a denoiser fitted on the sample. A given encoder (``encoder_path``) reads
    denoised amplitudes unchanged, as in ``localize``. ``localizer`` and the raw reader when it
    cannot be refined."""
    raw, epochs = prep.amplitudes, prep.params.constants.encoder_refine_epochs
    if (
        getattr(localizer, "refined", None) is None
        or localizer.net is None
        or localizer.fallback is not None
        or epochs <= 0
    ):
        return localizer, raw
    reader = fit_denoiser(prep, sample)
    if reader is None:
        return localizer, raw
    if prep.params.encoder_path is not None:
        return localizer, reader
    again = observed_again(prep, localizer, sample, reader, progress=progress, runner=runner)
    refined = localizer.refined(
        again.observations, prep.neighbourhood, prep.noise, epochs, progress
    )
    if refined is localizer:  # diverged: the clustering's localizer reads as it was trained
        return localizer, raw
    return refined, reader
