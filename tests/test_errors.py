"""Exceptions travel between processes (worker -> driver) as themselves."""

import copy
import pickle

import pytest

from deqntk_dist import errors
from deqntk_dist.errors import ClusterError, DeqntkError, FixedPointError, StoreMismatchError
from deqntk_dist.scheduling import failure_error, raise_failures

CLASSES = [getattr(errors, name) for name in errors.__all__]
EXCEPTIONS = [c for c in CLASSES if issubclass(c, DeqntkError)]


def _sample(cls):
    """An instance of ``cls`` with non-default attributes where it has any."""
    if cls is FixedPointError:
        return cls("tile did not converge", entries=[(0, 1), (3, 2)], n_failed=7)
    if cls is ClusterError:
        jobs = [{"job_id": "17", "state": "FAILED", "log": "/tmp/w.err"}]
        return cls("worker jobs failed to start", jobs=jobs)
    return cls(f"a {cls.__name__} happened")


def test_every_class_is_listed_and_a_deqntk_error_except_the_warning():
    assert set(CLASSES) - set(EXCEPTIONS) == {errors.DatasetWarning}
    assert len(EXCEPTIONS) == 12


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip_keeps_type_message_and_attributes(cls, protocol):
    exc = _sample(cls)
    exc.extra = {"note": 1}  # an attribute set after construction travels too
    back = pickle.loads(pickle.dumps(exc, protocol=protocol))
    assert type(back) is cls
    assert str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)
    if cls is FixedPointError:
        assert back.entries == [(0, 1), (3, 2)] and back.n_failed == 7
    if cls is ClusterError:
        assert back.jobs == [{"job_id": "17", "state": "FAILED", "log": "/tmp/w.err"}]


def test_cloudpickle_round_trip_as_dask_sends_it():
    cloudpickle = pytest.importorskip("cloudpickle")
    exc = FixedPointError("x", entries=[(1, 1)], n_failed=1)
    back = cloudpickle.loads(cloudpickle.dumps(exc))
    assert type(back) is FixedPointError and (back.entries, back.n_failed) == ([(1, 1)], 1)


class _Strict(DeqntkError, RuntimeError):
    """A subclass whose keyword-only attribute has no default (default pickling fails)."""

    _keyword_attrs = ("code",)

    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code


def test_keyword_only_attributes_need_no_default_to_unpickle():
    back = pickle.loads(pickle.dumps(_Strict("boom", code=3)))
    assert type(back) is _Strict and back.code == 3 and str(back) == "boom"


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_with_message_keeps_type_and_attributes(cls):
    exc = _sample(cls)
    new = exc.with_message("tile (0, 1) failed: inner")
    assert type(new) is cls and str(new) == "tile (0, 1) failed: inner"
    assert vars(new) == vars(exc)
    assert str(exc) != str(new)  # the original is untouched
    assert copy.copy(exc).args == exc.args


def test_failure_reports_are_raised_as_the_worker_error():
    exc = FixedPointError("did not converge for 7 entries", entries=[(0, 1)], n_failed=7)
    report = {"ok": False, "what": "tile (0, 1) rows [0, 8) x cols [8, 16)", "error": exc}
    with pytest.raises(FixedPointError) as info:
        raise_failures([report, dict(report)])
    err = info.value
    assert str(err) == (
        "tile (0, 1) rows [0, 8) x cols [8, 16) failed: did not converge for 7 entries "
        "(and 1 more failed tasks); finished tiles are kept in the store"
    )
    assert err.entries == [(0, 1)] and err.n_failed == 7
    assert err.__cause__ is exc


def test_other_failures_are_store_errors_chained_to_the_original():
    lost = ConnectionError("worker lost")
    err = failure_error([{"ok": False, "what": "self-covariance rows [0, 4)", "error": lost}])
    assert type(err) is errors.StoreError
    assert str(err) == (
        "self-covariance rows [0, 4) failed: ConnectionError: worker lost; "
        "finished tiles are kept in the store"
    )
    with pytest.raises(errors.StoreError) as info:
        raise_failures([{"ok": False, "what": "x", "error": lost}])
    assert info.value.__cause__ is lost
    mismatch = StoreMismatchError("attrs changed")
    with pytest.raises(StoreMismatchError, match=r"^x failed: attrs changed; finished"):
        raise_failures([{"ok": False, "what": "x", "error": mismatch}])
