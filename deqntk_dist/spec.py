"""Kernel specifications: frozen, validated, serialisable to store attributes."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self

from .errors import SpecError

__all__ = ["ACTIVATIONS", "READOUTS", "DEQSpec", "CDEQSpec", "spec_from_dict"]

#: Activations with closed-form dual maps; the others use Gauss-Hermite quadrature.
CLOSED_FORM_ACTIVATIONS = ("relu", "erf")
QUADRATURE_ACTIVATIONS = ("tanh", "gelu")
ACTIVATIONS = CLOSED_FORM_ACTIVATIONS + QUADRATURE_ACTIVATIONS
#: CDEQ readouts: flatten, global average pooling, local average pooling.
READOUTS = ("flatten", "gap", "lap")


def _check_variance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class _BaseSpec:
    sigma_w2: float
    sigma_u2: float
    sigma_b2: float = 0.0
    activation: str = "relu"
    hflip: bool = False

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name in ("sigma_w2", "sigma_u2", "sigma_b2"):
            object.__setattr__(self, name, _check_variance(name, getattr(self, name)))
        if not isinstance(self.hflip, bool):
            raise SpecError(f"hflip must be True or False, got {self.hflip!r}")
        if self.activation not in ACTIVATIONS:
            raise SpecError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.sigma_u2 == 0 and self.sigma_b2 == 0:
            raise SpecError(
                "sigma_u2 + sigma_b2 must be > 0 (with sigma_u2 = sigma_b2 = 0 the kernel is "
                "identically zero), got sigma_u2=0.0, sigma_b2=0.0"
            )
        if self.activation == "relu" and self.sigma_w2 >= 2:
            raise SpecError(
                "sigma_w2 must satisfy 0 <= sigma_w2 < 2 for the ReLU DEQ fixed point to exist "
                f"and be unique (the layer map is a contraction with factor sigma_w2/2), "
                f"got sigma_w2={self.sigma_w2!r}"
            )
        if self.sigma_u2 == 0:
            warnings.warn(
                "sigma_u2 = 0: the kernel ignores the input (it is a constant)",
                UserWarning,
                stacklevel=3,
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, including ``kind`` for :func:`spec_from_dict`."""
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise SpecError(f"spec kind must be {cls.kind!r} for {cls.__name__}, got {kind!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class DEQSpec(_BaseSpec):
    """Fully-connected deep equilibrium model (DEQ-NTK), DESIGN.md §1.1.

    Parameters
    ----------
    sigma_w2, sigma_u2, sigma_b2 : float
        Weight, input-injection and bias variances.
    activation : {"relu", "erf", "tanh", "gelu"}
        ReLU and erf use closed-form dual maps, the others Gauss-Hermite quadrature.
    hflip : bool
        Horizontal-flip symmetrisation ``K(x, y) = (K0(x, y) + K0(x, flip y)) / 2``; the
        rows must then be images ``(n, H, W, C)`` (flattened for the kernel).
    """

    kind: ClassVar[str] = "deq"


@dataclass(frozen=True, kw_only=True)
class CDEQSpec(_BaseSpec):
    """Convolutional deep equilibrium model (CDEQ-NTK), DESIGN.md §1.2.

    Parameters
    ----------
    sigma_w2, sigma_u2, sigma_b2 : float
        Weight, input-injection and bias variances.
    filter_size : int
        Odd filter side k (SAME zero padding), default 3.
    readout : {"flatten", "gap", "lap"}
        ``flatten`` averages offset-0 pixel pairs; ``gap`` (global average pooling) averages
        all pixel pairs; ``lap`` (local average pooling over ``pool_size`` x ``pool_size``
        windows, then flatten) weighs the pixel pairs at most ``pool_size - 1`` apart.
    pool_size : int, optional
        Odd window side c of ``lap`` (required with it, refused with the others); at most
        ``2 max(H, W) - 1``, checked against the images.
    activation : str
        As for :class:`DEQSpec`.
    hflip : bool
        Horizontal-flip symmetrisation ``K(x, y) = (K0(x, y) + K0(x, flip y)) / 2``.
    """

    filter_size: int = 3
    readout: str = "flatten"
    pool_size: int | None = None

    kind: ClassVar[str] = "cdeq"

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.filter_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise SpecError(f"filter_size must be an odd integer >= 1, got {k!r}")
        if self.readout not in READOUTS:
            raise SpecError(
                f"readout must be one of {', '.join(map(repr, READOUTS))}, got {self.readout!r}"
            )
        c = self.pool_size
        if self.readout == "lap":
            if isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % 2 == 0:
                raise SpecError(
                    f"pool_size must be an odd integer >= 1 with readout='lap', got {c!r}"
                )
        elif c is not None:
            raise SpecError(
                f"pool_size is only used with readout='lap', got pool_size={c!r} with "
                f"readout={self.readout!r}"
            )


_KINDS: dict[str, type[DEQSpec] | type[CDEQSpec]] = {
    DEQSpec.kind: DEQSpec,
    CDEQSpec.kind: CDEQSpec,
}


def spec_from_dict(data: dict[str, Any]) -> DEQSpec | CDEQSpec:
    """Rebuild a spec from :meth:`to_dict` output, dispatching on ``kind``."""
    kind = data.get("kind")
    if kind not in _KINDS:
        raise SpecError(f"spec kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    return _KINDS[kind].from_dict(data)
