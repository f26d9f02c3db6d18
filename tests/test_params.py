"""The public parameters: validated when built, one convention for off (None), help for each,
and every value (constants too) recorded and read back."""

from pathlib import Path

import pytest

from locsort.cli import _param_overrides
from locsort.constants import Constants
from locsort.errors import UsageError
from locsort.params import Params, markdown, params_with, public_fields


def test_defaults_are_valid_and_round_trip_through_a_dict_with_every_constant():
    params = Params()
    recorded = params.asdict()
    assert set(recorded["constants"]) == set(Constants().asdict())
    assert Params.from_dict(recorded) == params
    assert params_with(seed=3, sample_chunks=4) == Params(
        seed=3, constants=Constants(sample_chunks=4)
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"detect_threshold": -1.0}, "detect_threshold must be at least"),
        ({"detect_threshold": "high"}, "detect_threshold must be a float"),
        ({"common_reference": "mean"}, "common_reference cannot be 'mean'"),
        ({"device": "tpu"}, "device cannot be 'tpu'"),
        ({"n_jobs": 0}, "n_jobs must be at least 1"),
        ({"n_jobs": 2.5}, "n_jobs must be an int"),
        ({"bad_channels": "none"}, "use None"),
        ({"encoder_init": ""}, "encoder_init cannot be empty"),
        ({"freq_min": 7000.0}, "freq_min (7000 Hz) must be below freq_max"),
        ({"chunk_duration": float("nan")}, "chunk_duration must be finite"),
        ({"preprocess": None}, "preprocess cannot be None"),
        ({"sorter": "cluster"}, "unknown parameter(s): sorter"),
    ],
)
def test_bad_values_are_refused_when_the_parameters_are_built(values, message):
    with pytest.raises(UsageError) as error:
        Params.from_dict(values)
    assert message in str(error.value)


def test_none_means_off_and_ints_are_taken_for_floats():
    params = Params(common_reference=None, trace_cache_mb=None, bad_channels=None, freq_min=300)
    assert params.common_reference is None and isinstance(params.freq_min, float)
    with pytest.raises(UsageError, match="unknown constant"):
        Constants.from_dict({"detect_thresold": 5})


def test_every_parameter_has_a_help_line_with_its_allowed_values_and_the_docs_are_current():
    descriptions = Params.descriptions()
    assert list(descriptions) == [f.name for f in public_fields()]
    assert len(descriptions) <= 20
    for name, text in descriptions.items():
        assert len(text) > 30 and text.endswith(")"), (name, text)
    docs = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
    assert docs.read_text() == markdown(), "run scripts/write_parameter_docs.py"


def test_command_line_values_are_typed_and_none_is_off():
    assert _param_overrides(["trace_cache_mb=none", "n_jobs=2", "preprocess=false"]) == {
        "trace_cache_mb": None,
        "n_jobs": 2,
        "preprocess": False,
    }
    with pytest.raises(UsageError, match="unknown parameter 'sample_chunks'"):
        _param_overrides(["sample_chunks=3"])
    with pytest.raises(UsageError, match="needs a float"):
        _param_overrides(["detect_threshold=six"])
