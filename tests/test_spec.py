import math
import warnings

import pytest

from deqntk_dist import CDEQSpec, DEQSpec, SpecError, spec_from_dict


def test_roundtrip_deq_and_cdeq():
    for spec in (
        DEQSpec(sigma_w2=1.5, sigma_u2=0.8, sigma_b2=0.1),
        DEQSpec(sigma_w2=3.0, sigma_u2=1.0, activation="erf"),
        CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.2, filter_size=5, readout="gap"),
    ):
        d = spec.to_dict()
        assert spec_from_dict(d) == spec
        assert type(spec).from_dict(d) == spec


def test_frozen():
    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0)
    with pytest.raises(AttributeError):
        spec.sigma_w2 = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sigma_w2": 2.0, "sigma_u2": 1.0}, "sigma_w2"),
        ({"sigma_w2": 2.5, "sigma_u2": 1.0}, "0 <= sigma_w2 < 2"),
        ({"sigma_w2": -0.1, "sigma_u2": 1.0}, "sigma_w2"),
        ({"sigma_w2": 1.0, "sigma_u2": -1.0}, "sigma_u2"),
        ({"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": math.nan}, "sigma_b2"),
        ({"sigma_w2": 1.0, "sigma_u2": 0.0, "sigma_b2": 0.0}, r"sigma_u2 \+ sigma_b2"),
        ({"sigma_w2": 1.0, "sigma_u2": 1.0, "activation": "swish"}, "activation"),
        ({"sigma_w2": "1", "sigma_u2": 1.0}, "sigma_w2"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, needle):
    with pytest.raises(SpecError, match=needle):
        DEQSpec(**kwargs)
    # SpecError is also a ValueError
    with pytest.raises(ValueError):
        DEQSpec(**kwargs)


def test_erf_allows_large_sigma_w2_and_zero_input_warns():
    DEQSpec(sigma_w2=3.0, sigma_u2=1.0, activation="erf")
    with pytest.warns(UserWarning, match="sigma_u2 = 0"):
        DEQSpec(sigma_w2=1.0, sigma_u2=0.0, sigma_b2=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEQSpec(sigma_w2=1.0, sigma_u2=0.5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"filter_size": 2}, "odd"), ({"filter_size": 0}, "odd"), ({"readout": "max"}, "readout")],
)
def test_cdeq_invalid(kwargs, needle):
    with pytest.raises(SpecError, match=needle):
        CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, **kwargs)


def test_from_dict_rejects_unknown_and_wrong_kind():
    with pytest.raises(SpecError, match="unknown"):
        DEQSpec.from_dict({"kind": "deq", "sigma_w2": 1.0, "sigma_u2": 1.0, "depth": 3})
    with pytest.raises(SpecError, match="kind"):
        spec_from_dict({"kind": "rnn"})
    with pytest.raises(SpecError, match="kind"):
        DEQSpec.from_dict(CDEQSpec(sigma_w2=1.0, sigma_u2=1.0).to_dict())
