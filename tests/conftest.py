"""Shared small inputs: a 10-second generated ground-truth recording on the 64-channel
Neuropixels-like probe (the demo's recording, shortened)."""

import numpy as np
import pytest

from locsort.simulate import generate_recording


@pytest.fixture(scope="session")
def ground_truth_recording():
    recording, ground_truth = generate_recording(
        duration=10.0, num_units=20, noise_level=5.0, seed=1
    )
    return recording, ground_truth


@pytest.fixture(scope="session")
def int16_traces(ground_truth_recording):
    """2 s of the generated recording as int16 (gain 1 µV): what acquisition systems write."""
    recording, _ = ground_truth_recording
    traces = recording.get_traces(start_frame=0, end_frame=60_000)
    return np.round(traces).astype(np.int16)
