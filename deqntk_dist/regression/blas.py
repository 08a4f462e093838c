"""Direct BLAS / LAPACK calls on sub-blocks of one large array, without copies.

scipy's f2py wrappers copy any operand that is not contiguous, so a blocked factorization
of a sub-block of a 14 GB matrix through them would copy every panel twice.  The Fortran
routines scipy exports for Cython (``scipy.linalg.cython_blas`` / ``cython_lapack``) take
a leading dimension instead; this module calls them through :mod:`ctypes` on addresses
inside the caller's array.  Every routine here works on the *column-major* view of a
C-contiguous square array ``A`` of order ``ld``: element ``(i, j)`` of the view is
``A[j, i]``.

The caller guarantees that every block named lies inside the array; nothing is checked
per call (these are the inner loop of :mod:`.inplace`).
"""

from __future__ import annotations

import ctypes

import numpy as np
import scipy.linalg.cython_blas as _cblas
import scipy.linalg.cython_lapack as _clapack

__all__ = ["ColumnMajor"]

_VOID = ctypes.c_void_p
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

_NARGS = {"gemm": 13, "syrk": 10, "trsm": 11, "trmm": 11, "potrf": 5, "trtri": 6}


def _routine(name: str):
    module = _clapack if name[1:] in ("potrf", "trtri") else _cblas
    capsule = module.__pyx_capi__[name]
    address = _get_pointer(capsule, _get_name(capsule))
    return ctypes.CFUNCTYPE(None, *([_VOID] * _NARGS[name[1:]]))(address)


_ROUTINES: dict[str, object] = {}


def _get(prefix: str, name: str):
    key = prefix + name
    if key not in _ROUTINES:
        _ROUTINES[key] = _routine(key)
    return _ROUTINES[key]


def _char(c: str):
    return ctypes.c_char_p(c.encode())


def _int(v: int):
    return ctypes.byref(ctypes.c_int(int(v)))


class ColumnMajor:
    """The column-major view of a C-contiguous square float32 / float64 array.

    Parameters
    ----------
    A : ndarray, shape (ld, ld), C-contiguous, float32 or float64
        Kept alive by this object; blocks are addressed as ``(row, col)`` of the view.
    """

    def __init__(self, A: np.ndarray):
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.flags.c_contiguous:
            raise ValueError("A must be a C-contiguous square array")
        self._scalar: type[ctypes.c_float] | type[ctypes.c_double]
        if A.dtype == np.float32:
            self._p, self._scalar = "s", ctypes.c_float
        elif A.dtype == np.float64:
            self._p, self._scalar = "d", ctypes.c_double
        else:
            raise ValueError(f"A must be float32 or float64, got {A.dtype}")
        self.A = A
        self.ld = A.shape[0]
        self._base = A.ctypes.data
        self._item = A.dtype.itemsize

    def _at(self, r: int, c: int):
        return _VOID(self._base + self._item * (r + c * self.ld))

    def _num(self, v: float):
        return ctypes.byref(self._scalar(v))

    def potrf(self, k0: int, kb: int) -> int:
        """Lower Cholesky of the ``kb`` x ``kb`` diagonal block at ``(k0, k0)`` in place;
        returns LAPACK's ``info`` (0, or the failing column + 1)."""
        info = ctypes.c_int(0)
        _get(self._p, "potrf")(_char("L"), _int(kb), self._at(k0, k0), _int(self.ld),
                               ctypes.byref(info))  # fmt: skip
        return info.value

    def panel_divide(self, k0: int, kb: int, r0: int, m: int) -> None:
        """``B := B L^{-T}`` for ``B`` the ``m`` x ``kb`` block at ``(r0, k0)`` and ``L`` the
        lower triangle of the diagonal block at ``(k0, k0)``, as a multiplication by the
        explicit inverse (``trmm`` runs ~1.4x faster than ``trsm`` here; the result
        preconditions, so the inverse's rounding is harmless)."""
        inv = np.array(self.A[k0 : k0 + kb, k0 : k0 + kb].T, order="F")
        info = ctypes.c_int(0)
        _get(self._p, "trtri")(_char("L"), _char("N"), _int(kb), _VOID(inv.ctypes.data),
                               _int(kb), ctypes.byref(info))  # fmt: skip
        if info.value:  # pragma: no cover - cannot happen after a successful potrf
            raise ArithmeticError(f"triangular inverse failed ({info.value})")
        _get(self._p, "trmm")(
            _char("R"), _char("L"), _char("T"), _char("N"), _int(m), _int(kb), self._num(1.0),
            _VOID(inv.ctypes.data), _int(kb), self._at(r0, k0), _int(self.ld),
        )  # fmt: skip

    def syrk_lower(self, j0: int, jb: int, k0: int, kb: int) -> None:
        """Lower triangle of the diagonal block at ``(j0, j0)`` ``-=`` ``P P^T``, ``P`` the
        ``jb`` x ``kb`` block at ``(j0, k0)``."""
        _get(self._p, "syrk")(
            _char("L"), _char("N"), _int(jb), _int(kb), self._num(-1.0), self._at(j0, k0),
            _int(self.ld), self._num(1.0), self._at(j0, j0), _int(self.ld),
        )  # fmt: skip

    def gemm_update(self, r0: int, m: int, j0: int, jb: int, k0: int, kb: int) -> None:
        """Block at ``(r0, j0)`` (``m`` x ``jb``) ``-=`` ``P_r P_j^T`` with ``P_r`` the block
        at ``(r0, k0)`` (``m`` x ``kb``) and ``P_j`` the block at ``(j0, k0)``."""
        _get(self._p, "gemm")(
            _char("N"), _char("T"), _int(m), _int(jb), _int(kb), self._num(-1.0),
            self._at(r0, k0), _int(self.ld), self._at(j0, k0), _int(self.ld),
            self._num(1.0), self._at(r0, j0), _int(self.ld),
        )  # fmt: skip

    def solve_lower(self, m: int, Z: np.ndarray, block: int) -> None:
        """``Z := (L L^T)^{-1} Z`` in place for ``L`` the lower triangle of the leading
        ``m`` x ``m`` block and ``Z`` an F-contiguous (m, c) array of this dtype.

        Blocked: a small ``trsm`` per diagonal block and one GEMM per panel below it, so
        the factor is read twice in long columns (LAPACK's ``trsm`` with a few right-hand
        sides runs at a third of the memory bandwidth)."""
        assert Z.flags.f_contiguous and Z.shape[0] == m and Z.dtype == self.A.dtype
        c = Z.shape[1]
        z0 = Z.ctypes.data
        item = self._item
        ld = _int(self.ld)
        trsm, gemm = _get(self._p, "trsm"), _get(self._p, "gemm")
        bounds = [(k0, min(block, m - k0)) for k0 in range(0, m, block)]

        def z(r: int):
            return _VOID(z0 + item * r)

        one, minus = self._num(1.0), self._num(-1.0)
        for k0, kb in bounds:  # forward: L y = Z
            trsm(_char("L"), _char("L"), _char("N"), _char("N"), _int(kb), _int(c), one,
                 self._at(k0, k0), ld, z(k0), _int(m))  # fmt: skip
            r0 = k0 + kb
            if r0 < m:
                gemm(_char("N"), _char("N"), _int(m - r0), _int(c), _int(kb), minus,
                     self._at(r0, k0), ld, z(k0), _int(m), one, z(r0), _int(m))  # fmt: skip
        for k0, kb in reversed(bounds):  # backward: L^T x = y
            r0 = k0 + kb
            if r0 < m:
                gemm(_char("T"), _char("N"), _int(kb), _int(c), _int(m - r0), minus,
                     self._at(r0, k0), ld, z(r0), _int(m), one, z(k0), _int(m))  # fmt: skip
            trsm(_char("L"), _char("L"), _char("T"), _char("N"), _int(kb), _int(c), one,
                 self._at(k0, k0), ld, z(k0), _int(m))  # fmt: skip
