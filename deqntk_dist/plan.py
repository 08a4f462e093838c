"""Tiling plan of a symmetric N x N Gram: the tile grid and the upper-triangle tiles.

The plan is a pure, serialisable value: it knows nothing of stores, dask or data.  Tile
``(I, J)`` covers rows ``[I*tile, min((I+1)*tile, n))`` and the same range of columns for
``J``.  Only tiles with ``I <= J`` are computed; each also fills its mirror ``(J, I)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import InputError

__all__ = [
    "BYTES_PER_TILE_ENTRY",
    "DIAGONAL_COST",
    "FC_PAIR_SECONDS",
    "MIN_CHECKED_TILES",
    "TILES_PER_WORKER",
    "TILE_ALIGN",
    "TILE_OVERHEAD_SECONDS",
    "TilePlan",
    "cdeq_pair_seconds",
    "cdeq_pixel_pairs",
    "check_plan_size",
    "choose_tile",
    "fc_pair_seconds",
    "tile_cap",
]

#: Time of a diagonal tile relative to an off-diagonal one of the same side (measured
#: 0.6-0.64 for ReLU 2560-row tiles on a dask worker).
DIAGONAL_COST = 0.6
#: Default tiles per worker thread at least: with T tiles on W workers the last round idles
#: about W / (2 T) of the run (measured at 20k rows on 2 workers: 15 tiles of 4096 reached
#: 0.67-0.70 of the bare kernel, 28 tiles of 3072 0.74).
TILES_PER_WORKER = 8
#: Tiles larger than this are rounded down to a multiple of it (the Gram GEMM block).
TILE_ALIGN = 512
#: Wall time a CDEQ tile should take on one core (a lost worker then loses minutes).
TARGET_TILE_SECONDS = 600.0
#: CDEQ cost on one core: seconds per pixel pair, and per offset slice on top.  About twice
#: the rates fitted to ``scripts/bench_conv.py`` (2026-12-07, commit 1830b10, float32-store
#: tolerance, sigma_w2 = 1.5, 28x28x1 flatten, lap5 and gap per CPU-second: 1.78e-8 and
#: 1.56e-6, within 1.3 % of all three), for real images (Fashion-MNIST ran 1.2-1.5x slower
#: than the synthetic ones) and slower cores.
PIXEL_PAIR_SECONDS = 3.5e-8
SLICE_SECONDS = 3e-6
#: Peak worker bytes per tile entry: float64 Gram + ntk + nngp + residual scratch
#: (4 x 8 bytes) plus the cast and transposed store copies of two kernels (4 x 4 bytes).
BYTES_PER_TILE_ENTRY = 48
#: FC kernel seconds per entry on one core, a lower bound (README: 1.5e7 ReLU entries/s
#: on one thread; tanh and gelu use 2-D quadrature, measured ~7.5e-4 s on a loaded core).
FC_PAIR_SECONDS = {"relu": 7e-8, "erf": 1e-7, "tanh": 3e-4, "gelu": 3e-4}
#: Fixed cost of one tile besides its maths (a scheduler task, two row reads, ~16 small
#: ledger and chunk files), an optimistic bound: 64-row tiles measured 0.11 worker-seconds
#: each on the loaded 2-core development machine.
TILE_OVERHEAD_SECONDS = 0.02
#: Plans with at most this many tiles are never refused as overhead-bound.
MIN_CHECKED_TILES = 1000


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class TilePlan:
    """The tile grid of an ``n x n`` symmetric Gram.

    Parameters
    ----------
    n : int
        Number of rows (and columns), >= 1.
    tile : int
        Tile side, >= 1 (the last tile of a row may be smaller).
    """

    n: int
    tile: int

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("tile", self.tile, 1)

    @property
    def n_blocks(self) -> int:
        """Tiles per side, ``ceil(n / tile)``."""
        return -(-self.n // self.tile)

    @property
    def n_tiles(self) -> int:
        """Number of computed (upper-triangle) tiles, ``nb (nb + 1) / 2``."""
        nb = self.n_blocks
        return nb * (nb + 1) // 2

    def bounds(self, block: int) -> tuple[int, int]:
        """Row range ``(start, stop)`` of row block ``block``."""
        if not 0 <= block < self.n_blocks:
            raise InputError(f"block must satisfy 0 <= block < {self.n_blocks}, got {block}")
        start = block * self.tile
        return start, min(start + self.tile, self.n)

    def tiles(self) -> list[tuple[int, int]]:
        """All tiles ``(I, J)`` with ``I <= J``, row-major.

        Consecutive tiles share their row block ``I``, so a worker that runs neighbours
        re-uses the rows it has just read.
        """
        nb = self.n_blocks
        return [(i, j) for i in range(nb) for j in range(i, nb)]

    def entries(self, tile: tuple[int, int]) -> int:
        """Kernel entries a tile fills in the store (its own and its mirror's)."""
        i, j = tile
        r0, r1 = self.bounds(i)
        c0, c1 = self.bounds(j)
        return (r1 - r0) * (c1 - c0) * (1 if i == j else 2)

    def cost(self, tile: tuple[int, int]) -> float:
        """Relative compute cost of a tile: its entries, a diagonal tile at
        :data:`DIAGONAL_COST` of a full one (its upper triangle and a mirror pass)."""
        i, j = tile
        r0, r1 = self.bounds(i)
        c0, c1 = self.bounds(j)
        return (r1 - r0) * (c1 - c0) * (DIAGONAL_COST if i == j else 1.0)

    def usable_first(
        self,
        tiles: list[tuple[int, int]],
        *,
        n_train: int | None = None,
        last_round: int = 0,
    ) -> list[tuple[int, int]]:
        """``tiles`` in the order that keeps a partly computed store usable.

        Training row block by row block (the blocks holding rows below ``n_train``): block
        ``K``'s diagonal tile, its tiles against the blocks before it, then against every
        test block; the test x test tiles last.  When the first ``K`` training blocks are
        done, the leading ``K`` x ``K`` block of the Gram is complete and so are the test
        rows against it, which is what a solve of an interrupted store
        (``--allow-incomplete``) uses.  The final ``last_round`` tiles (those that run in
        the last round of a job) go largest first, so workers finish together.

        Parameters
        ----------
        tiles : list of (int, int)
            Upper-triangle tiles of this plan (e.g. the missing ones).
        n_train : int, optional
            Training rows (default: all rows).
        last_round : int
            Tiles at the end reordered by decreasing :meth:`cost`.
        """
        nt = self.n if n_train is None else int(n_train)
        blocks = range(self.n_blocks)
        train = [b for b in blocks if self.bounds(b)[0] < nt]
        test = [b for b in blocks if self.bounds(b)[0] >= nt]
        seq: list[tuple[int, int]] = []
        for k in train:
            seq.append((k, k))
            seq.extend((i, k) for i in range(k))
            seq.extend((k, t) for t in test)
        for pos, k in enumerate(test):
            seq.append((k, k))
            seq.extend((t, k) for t in test[:pos])
        rank = {t: r for r, t in enumerate(seq)}
        out = sorted(tiles, key=rank.__getitem__)
        if last_round > 0:
            head, tail = out[:-last_round], out[-last_round:]
            out = head + sorted(tail, key=lambda t: -self.cost(t))
        return out

    def largest_first(self, tiles: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``tiles`` by decreasing :meth:`cost`, plan order among equals.

        Submitting the longest tiles first leaves the short ones (diagonal and edge tiles)
        to fill the last round, so workers finish together; equal full tiles stay
        row-major, so consecutive ones still share a row block.
        """
        order = {t: k for k, t in enumerate(self.tiles())}
        return sorted(tiles, key=lambda t: (-self.cost(t), order[t]))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TilePlan:
        return cls(n=int(data["n"]), tile=int(data["tile"]))


def cdeq_pixel_pairs(readout: str, pool_size: int | None, H: int, W: int) -> tuple[int, int]:
    """Pixel pairs and offset slices one CDEQ image pair solves for a readout.

    flatten: the offset-0 slice (``HW`` pixel pairs); gap: every offset (``(HW)^2``); lap
    with window ``c``: the offsets with ``|delta| <= c - 1`` per axis.
    """
    if readout == "flatten":
        return H * W, 1
    if readout == "gap":
        return (H * W) ** 2, (2 * H - 1) * (2 * W - 1)
    assert pool_size is not None  # readout "lap" has a window (CDEQSpec checks)
    e1, e2 = min(pool_size - 1, H - 1), min(pool_size - 1, W - 1)
    rows = sum(H - abs(d) for d in range(-e1, e1 + 1))
    cols = sum(W - abs(d) for d in range(-e2, e2 + 1))
    return rows * cols, (2 * e1 + 1) * (2 * e2 + 1)


def cdeq_pair_seconds(spec, feature_shape) -> float:
    """Estimated seconds of one CDEQ image pair on one core (float32-store tolerance).

    ``PIXEL_PAIR_SECONDS`` per pixel pair plus ``SLICE_SECONDS`` per offset slice, twice
    with ``hflip``; ``spec`` needs ``readout``, ``pool_size`` and ``hflip``.
    """
    H, W = int(feature_shape[0]), int(feature_shape[1])
    pixels, slices = cdeq_pixel_pairs(spec.readout, spec.pool_size, H, W)
    seconds = PIXEL_PAIR_SECONDS * pixels + SLICE_SECONDS * slices
    return seconds * (2 if spec.hflip else 1)


def fc_pair_seconds(spec) -> float:
    """Lower bound of the FC kernel's seconds per entry on one core (twice with ``hflip``)."""
    seconds = FC_PAIR_SECONDS.get(spec.activation, max(FC_PAIR_SECONDS.values()))
    return seconds * (2 if spec.hflip else 1)


def check_plan_size(n: int, tile: int, *, pair_seconds: float, files_per_tile: int) -> None:
    """Refuse a tiling whose fixed per-tile costs would dwarf the kernel maths.

    A plan with more than :data:`MIN_CHECKED_TILES` tiles is refused when its tiles'
    fixed cost (:data:`TILE_OVERHEAD_SECONDS` each) exceeds twice the estimated compute
    of the whole Gram (``n (n + 1) / 2 * pair_seconds``): e.g. a tile of 1 on 400 rows
    (80,200 tiles, 1.3 million files, for milliseconds of maths), while 64-row CDEQ tiles
    whose pairs take seconds pass.

    Parameters
    ----------
    n : int
        Rows of the Gram.
    tile : int
        Tile side.
    pair_seconds : float
        Seconds per kernel entry on one core (:func:`fc_pair_seconds`,
        :func:`cdeq_pair_seconds`).
    files_per_tile : int
        Files an off-diagonal tile writes (for the message).

    Raises
    ------
    InputError
        Naming ``tile``, the tile and file counts, the limit and a tile that passes.
    """
    plan = TilePlan(n=n, tile=tile)
    compute = n * (n + 1) / 2 * pair_seconds
    limit = max(MIN_CHECKED_TILES, int(2 * compute / TILE_OVERHEAD_SECONDS))
    if plan.n_tiles <= limit:
        return
    blocks = int((math.isqrt(8 * limit + 1) - 1) // 2)
    suggest = -(-n // max(1, blocks))
    raise InputError(
        f"tile must give at most {limit:,} tiles for n = {n:,} rows (each tile costs "
        f"~{TILE_OVERHEAD_SECONDS:g} s of scheduling and ~{files_per_tile} files, against "
        f"~{compute:.3g} s of kernel maths in all), got tile {tile}: {plan.n_tiles:,} tiles "
        f"and ~{plan.n_tiles * files_per_tile:,} files; use tile={suggest} or larger, or "
        "leave the tile unset for the default"
    )


def tile_cap(n: int, *, workers: int, pair_seconds: float | None = None) -> int:
    """Largest tile side that keeps the job balanced and each tile short.

    At least ``TILES_PER_WORKER * workers`` upper-triangle tiles (so the last round of tiles
    does not leave workers idle for long), and, given the cost of one pair (the CDEQ kernel:
    :func:`cdeq_pair_seconds`), a side whose tile takes about ``TARGET_TILE_SECONDS`` on one
    core (a multiple of 32, at least 32), so a lost worker loses little.

    Parameters
    ----------
    n : int
        Number of rows of the Gram.
    workers : int
        Worker threads that run tiles.
    pair_seconds : float, optional
        Seconds per kernel entry on one core (None: the FC kernel, bound by memory only).

    Returns
    -------
    int
    """
    n = _check_int("n", n, 1)
    workers = _check_int("workers", workers, 1)
    cap = n
    target = 1
    while cap > 1:
        blocks = -(-n // cap)
        if blocks * (blocks + 1) // 2 >= TILES_PER_WORKER * workers:
            break
        target = max(target, blocks) + 1
        cap = -(-n // target)
    if pair_seconds is not None:
        if not (isinstance(pair_seconds, int | float) and pair_seconds > 0):
            raise InputError(f"pair_seconds must be a number > 0, got {pair_seconds!r}")
        side = int(math.sqrt(TARGET_TILE_SECONDS / pair_seconds))
        cap = min(cap, max(32, side - side % 32))
    return max(1, cap)


def choose_tile(
    n: int, memory_budget: int, *, align: int = TILE_ALIGN, max_side: int | None = None
) -> int:
    """Largest tile side whose working set fits ``memory_budget`` bytes of one worker.

    The side is a multiple of ``align`` when that is possible (whole Gram GEMM blocks),
    never more than ``n`` and at least ``min(n, 64)``; among the sides giving the fewest
    row blocks it takes the smallest (balanced blocks, no thin last block).

    Parameters
    ----------
    n : int
        Number of rows of the Gram.
    memory_budget : int
        Bytes one tile may use on a worker.
    max_side : int, optional
        Upper bound on the side (e.g. :func:`tile_cap`).

    Returns
    -------
    int
    """
    n = _check_int("n", n, 1)
    memory_budget = _check_int("memory_budget", memory_budget, 1)
    side = int(math.isqrt(memory_budget // BYTES_PER_TILE_ENTRY))
    if max_side is not None:
        side = max(1, min(side, _check_int("max_side", max_side, 1)))
    if side >= n:
        return n
    if side >= align:
        side -= side % align
    side = max(min(n, 64), side)
    # same number of row blocks, but as even as the alignment allows (a thin last block
    # costs a whole round of tiles for few entries)
    blocks = -(-n // side)
    even = -(-n // blocks)
    if side >= align:
        even = -(-even // align) * align
    return min(side, even)
