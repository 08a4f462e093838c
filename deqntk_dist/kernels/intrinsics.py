"""numba intrinsics of the compiled slice solver: an explicit FMA, a borrowed view and
the bits of a float.

* :func:`fma` rounds ``a * b + c`` once wherever it runs, so the bits of a polynomial or a
  recurrence line do not depend on the compiler's contraction choices.
* :func:`borrow` gives a view of an array that carries no reference count.  numba counts
  references to every array it passes or slices (an atomic add and subtract on the array's
  ``meminfo`` per call, view and variable); in the slice solver, whose tiny slices each make
  a few dozen calls, that was 28 % of a gap pair's time on one thread, and with two threads
  the counts of the shared image arrays bounce a cache line between the cores.  A borrowed
  view has a null ``meminfo``, so numba's increments and decrements of it return at once.
* :func:`abs_bits` and :func:`from_bits` reinterpret a float's bits as an unsigned integer
  and back.  The magnitude bits of an IEEE number order it like its absolute value (NaN
  above inf), so an integer maximum of them is an exact ``max |x|`` that vectorises (a
  floating-point maximum does not without fast-math flags) and is NaN if any ``x`` is.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["abs_bits", "borrow", "fma", "from_bits"]


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``), for three floats of one type.

    Written out rather than left to ``fastmath={"contract"}``: whether LLVM contracts a
    product and a sum depends on how it inlined the code, which differs between a freshly
    compiled and a cache-loaded function, so contraction made a slice's bits depend on the
    state of numba's cache.  An explicit FMA rounds the same way wherever it runs (in
    hardware, or exactly in software on a CPU without FMA).
    """
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.return_type)
        name = "llvm.fma.f32" if signature.return_type == types.float32 else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def borrow(typingctx, arr):
    """A view of ``arr`` (same data, shape and strides) that holds no reference.

    Safe only while something else keeps ``arr`` alive: the caller's arguments for the
    whole call, or a local array used again after the last use of its view.  A borrowed
    view must never leave compiled code (returned or stored in an object).
    """
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(arr)(context, builder, args[0])
        view = context.make_array(arr)(context, builder)
        for field in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(view, field, getattr(src, field))
        view.meminfo = context.get_constant_null(types.MemInfoPointer(arr.dtype))
        view.parent = context.get_constant_null(types.pyobject)
        return view._getvalue()

    return arr(arr), codegen


@intrinsic
def abs_bits(typingctx, x):
    """The bits of ``|x|``: an unsigned integer of the float's width (uint32 for float32,
    uint64 for float64) with the sign bit cleared."""
    if not isinstance(x, types.Float) or x not in (types.float32, types.float64):
        return None
    width = 32 if x == types.float32 else 64
    uint = types.uint32 if width == 32 else types.uint64

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(width))
        return builder.and_(bits, ir.Constant(ir.IntType(width), (1 << (width - 1)) - 1))

    return uint(x), codegen


@intrinsic
def from_bits(typingctx, u):
    """The float whose bits are ``u`` (float32 for uint32, float64 for uint64)."""
    if u not in (types.uint32, types.uint64):
        return None
    flt = types.float32 if u == types.uint32 else types.float64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(flt))

    return flt(u), codegen
