import json

import numpy as np
import pytest

from deqntk_dist.errors import InputError
from deqntk_dist.plan import BYTES_PER_TILE_ENTRY, TilePlan, choose_tile


@pytest.mark.parametrize(("n", "tile"), [(1, 1), (7, 3), (50, 16), (64, 16), (300, 64), (5, 9)])
def test_tiles_and_mirrors_cover_every_entry_once(n, tile):
    plan = TilePlan(n=n, tile=tile)
    count = np.zeros((n, n), dtype=int)
    for i, j in plan.tiles():
        assert i <= j
        r0, r1 = plan.bounds(i)
        c0, c1 = plan.bounds(j)
        count[r0:r1, c0:c1] += 1
        if i != j:
            count[c0:c1, r0:r1] += 1
    assert (count == 1).all()
    assert len(plan.tiles()) == plan.n_tiles == plan.n_blocks * (plan.n_blocks + 1) // 2
    assert sum(plan.entries(t) for t in plan.tiles()) == n * n


def test_row_major_order_shares_row_blocks():
    tiles = TilePlan(n=100, tile=30).tiles()
    assert tiles[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    rows = [i for i, _ in tiles]
    assert rows == sorted(rows)


def test_plan_is_a_serialisable_value():
    plan = TilePlan(n=70000, tile=4608)
    again = TilePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and hash(again) == hash(plan)
    assert plan.bounds(plan.n_blocks - 1) == (15 * 4608, 70000)


@pytest.mark.parametrize(
    ("kw", "word"),
    [({"n": 0, "tile": 4}, "n"), ({"n": 4, "tile": 0}, "tile"), ({"n": 4.0, "tile": 2}, "n")],
)
def test_plan_rejects_bad_values(kw, word):
    with pytest.raises(InputError, match=word):
        TilePlan(**kw)


def test_bounds_out_of_range():
    with pytest.raises(InputError, match="block"):
        TilePlan(n=10, tile=4).bounds(3)


@pytest.mark.parametrize("n", [20000, 70000, 12345])
@pytest.mark.parametrize("budget", [2**20, 2**28, 2**30, 3 * 2**30])
def test_choose_tile_fits_the_budget_with_fewest_balanced_blocks(n, budget):
    tile = choose_tile(n, budget)
    assert tile * tile * BYTES_PER_TILE_ENTRY <= budget or tile == 64
    # brute force: the largest aligned side that fits gives the fewest row blocks
    fits = [s for s in range(512, n + 512, 512) if s * s * BYTES_PER_TILE_ENTRY <= budget]
    if fits and tile >= 512:
        assert tile % 512 == 0
        blocks = -(-n // min(max(fits), n))
        assert -(-n // tile) == blocks
        assert -(-n // (tile - 512)) > blocks  # the smallest aligned side with that count


def test_choose_tile_small_problems():
    assert choose_tile(300, 2**30) == 300
    assert choose_tile(10, 1) == 10
    with pytest.raises(InputError, match="memory_budget"):
        choose_tile(100, 0)


def test_tile_cap_balances_workers_and_bounds_cdeq_tiles():
    from deqntk_dist.plan import TILES_PER_WORKER, tile_cap

    for n, workers in [(20000, 2), (70000, 8), (1000, 3), (7, 4)]:
        cap = tile_cap(n, workers=workers)
        plan = TilePlan(n=n, tile=cap)
        # enough upper-triangle tiles to keep every worker busy (unless rows run out)
        assert plan.n_tiles >= min(TILES_PER_WORKER * workers, n * (n + 1) // 2)
    # CDEQ tiles sized to take TARGET_TILE_SECONDS on one core
    from deqntk_dist import CDEQSpec
    from deqntk_dist.plan import TARGET_TILE_SECONDS, cdeq_pair_seconds, cdeq_pixel_pairs

    assert cdeq_pixel_pairs("flatten", None, 28, 28) == (784, 1)
    assert cdeq_pixel_pairs("gap", None, 28, 28) == (614656, 3025)
    assert cdeq_pixel_pairs("lap", 5, 28, 28) == (53824, 81)  # the count
    assert cdeq_pixel_pairs("lap", 99, 5, 6) == cdeq_pixel_pairs("gap", None, 5, 6)
    sides = {}
    for readout, pool in (("flatten", None), ("lap", 5), ("gap", None)):
        spec = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, readout=readout, pool_size=pool)
        sec = cdeq_pair_seconds(spec, (28, 28, 1))
        side = tile_cap(60000, workers=1, pair_seconds=sec)
        assert side % 32 == 0 and side * side * sec <= TARGET_TILE_SECONDS
        assert side == 32 or (side + 32) ** 2 * sec > TARGET_TILE_SECONDS
        sides[readout] = side
        flip = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, readout=readout, pool_size=pool, hflip=True)
        assert cdeq_pair_seconds(flip, (28, 28, 1)) == 2 * sec
    assert sides["flatten"] > sides["lap"] > sides["gap"] >= 32
    assert tile_cap(50, workers=1, pair_seconds=1e-3) == tile_cap(50, workers=1)
    with pytest.raises(InputError, match="pair_seconds"):
        tile_cap(50, workers=1, pair_seconds=0)
    # the cap bounds the memory-derived choice
    assert choose_tile(70000, 2**31, max_side=1024) <= 1024
    with pytest.raises(InputError, match="max_side"):
        choose_tile(100, 2**20, max_side=0)


def test_largest_first_orders_by_cost_and_keeps_row_order_among_equals():
    from deqntk_dist.plan import DIAGONAL_COST

    plan = TilePlan(n=1000, tile=300)  # blocks of 300, 300, 300, 100
    tiles = plan.tiles()
    order = plan.largest_first(tiles[::-1])
    assert sorted(order) == sorted(tiles)
    costs = [plan.cost(t) for t in order]
    assert costs == sorted(costs, reverse=True)
    # full off-diagonal tiles first, row-major; then full diagonal ones; edge tiles last
    assert order[:3] == [(0, 1), (0, 2), (1, 2)]
    assert order[3:6] == [(0, 0), (1, 1), (2, 2)]
    assert plan.cost((0, 0)) == DIAGONAL_COST * 300 * 300
    assert order[-1] == (3, 3) and plan.cost((0, 3)) == 300 * 100


def _leading_blocks(plan, done, n_train):
    """Training blocks 0..m-1 complete against each other (what complete_rows uses)."""
    m = 0
    train = [b for b in range(plan.n_blocks) if plan.bounds(b)[0] < n_train]
    while m < len(train) and all((i, m) in done for i in range(m + 1)):
        m += 1
    return m


def test_usable_first_keeps_a_leading_block_complete_at_every_moment():
    """After any number of finished tiles (in order), the finished tiles cover the largest
    leading block that many tiles can cover, with every test row against it; the old
    largest-first order had no diagonal tile at all for most of a run."""
    plan = TilePlan(n=1000, tile=100)
    n_train = 750  # blocks 0..7 hold training rows (block 7 straddles), 8 and 9 test rows
    order = plan.usable_first(plan.tiles(), n_train=n_train)
    assert sorted(order) == plan.tiles()
    assert order[:6] == [(0, 0), (0, 8), (0, 9), (1, 1), (0, 1), (1, 8)]
    # shell k of a training block: its diagonal, k tiles against earlier blocks, 2 test tiles
    shells = np.cumsum([1 + k + 2 for k in range(8)])
    for k in range(len(order) + 1):
        done = set(order[:k])
        shells_done = int(np.searchsorted(shells, k, side="right"))
        m = _leading_blocks(plan, done, n_train)
        # complete shells, and the next block once its training tiles are in
        assert shells_done <= m <= shells_done + 1
        assert all((b, t) in done for b in range(shells_done) for t in (8, 9))
    assert set(order[-3:]) == {(8, 8), (8, 9), (9, 9)}  # test x test last
    old = plan.largest_first(plan.tiles())
    half = set(old[: len(old) // 2])
    assert _leading_blocks(plan, half, n_train) == 0 and not any(i == j for i, j in half)


def test_usable_first_balances_the_last_round():
    plan = TilePlan(n=1000, tile=300)  # blocks of 300, 300, 300, 100
    order = plan.usable_first(plan.tiles(), last_round=4)
    plain = plan.usable_first(plan.tiles())
    assert order[:-4] == plain[:-4] and sorted(order[-4:]) == sorted(plain[-4:])
    costs = [plan.cost(t) for t in order[-4:]]
    assert costs == sorted(costs, reverse=True)
    # a subset (the tiles a resume still needs) keeps the same relative order
    some = plain[::3]
    assert plan.usable_first(some[::-1]) == some


def test_absurd_plans_are_refused_with_the_numbers():
    from deqntk_dist import CDEQSpec, DEQSpec
    from deqntk_dist.plan import check_plan_size, fc_pair_seconds

    fc = fc_pair_seconds(DEQSpec(sigma_w2=1.0, sigma_u2=1.0))
    with pytest.raises(InputError) as e:
        check_plan_size(400, 1, pair_seconds=fc, files_per_tile=16)
    msg = str(e.value)
    assert "tile must give at most 1,000 tiles for n = 400 rows" in msg
    assert "got tile 1: 80,200 tiles and ~1,283,200 files" in msg
    assert "use tile=10 or larger" in msg
    check_plan_size(400, 10, pair_seconds=fc, files_per_tile=16)  # the suggestion passes
    check_plan_size(400, 16, pair_seconds=fc, files_per_tile=16)
    check_plan_size(70000, 512, pair_seconds=fc, files_per_tile=16)
    with pytest.raises(InputError, match="70,000 rows"):
        check_plan_size(70000, 256, pair_seconds=fc, files_per_tile=16)
    # small CDEQ gap tiles on 60k images are a sensible plan (each takes minutes)
    from deqntk_dist.plan import cdeq_pair_seconds

    gap = cdeq_pair_seconds(CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, readout="gap"), (28, 28, 1))
    check_plan_size(60000, 64, pair_seconds=gap, files_per_tile=16)
