"""One CLI vocabulary: new flags, the earlier spellings (with a one-line deprecation
warning), sizes through the one parser, and library parameter names shown as flags."""

import warnings

import pytest

from deqntk_dist.cli import FlagDeprecationWarning, build_parser, main
from deqntk_dist.cli.vocabulary import (
    compute_options_from_args,
    flag_hints,
    solve_options_from_args,
)
from deqntk_dist.options import ComputeOptions, SolveOptions

DS, KS = "ds.zarr", "ks.zarr"


def _parse(argv):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        args = build_parser().parse_args(argv)
    return args, [str(w.message) for w in seen if w.category is FlagDeprecationWarning]


# (command prefix, old spelling, new spelling, dest, value)
RENAMED = [
    (["compute", DS, KS], ["--kernel", "cdeq"], ["--model", "cdeq"], "model", "cdeq"),
    (["compute", DS, KS], ["--what", "ntk"], ["--kernels", "ntk"], "kernels", ("ntk",)),
    (["run", "--workdir", "w"], ["--kernel", "cdeq"], ["--model", "cdeq"], "model", "cdeq"),
    (["run", "--workdir", "w"], ["--what", "nngp"], ["--kernels", "nngp"], "kernels", ("nngp",)),
    (["run", "--workdir", "w"], ["--lambdas", "1e-3,1e-2"], ["--ridges", "1e-3,1e-2"], "ridges",
     (1e-3, 1e-2)),
    (["run", "--workdir", "w"], ["--solve-method", "cg"], ["--solver", "cg"], "solver", "cg"),
    (["run", "--workdir", "w"], ["--solve-kernel", "nngp"], ["--kernel", "nngp"], "kernel",
     "nngp"),
    (["solve", KS], ["--ridge", "1e-3"], ["--ridges", "1e-3"], "ridges", (1e-3,)),
    (["solve", KS], ["--method", "cholesky"], ["--solver", "cholesky"], "solver", "cholesky"),
]  # fmt: skip


@pytest.mark.parametrize("prefix, old, new, dest, value", RENAMED)
def test_old_spellings_still_work_with_one_warning(prefix, old, new, dest, value):
    args_new, warned_new = _parse([*prefix, *new])
    args_old, warned_old = _parse([*prefix, *old])
    assert getattr(args_new, dest) == value == getattr(args_old, dest)
    assert vars(args_new) == vars(args_old)
    assert warned_new == []
    assert len(warned_old) == 1 and "deprecated" in warned_old[0]
    assert new[0] in warned_old[0] and old[0] in warned_old[0]


def test_the_warning_is_one_line_on_stderr(tmp_path, capsys):
    """Through ``main``: the deprecation is one ``deqntk CMD: warning:`` line, then the
    command runs as with the new spelling (here: a missing store, a one-line error)."""
    assert main(["solve", str(tmp_path / "none"), "--ridge", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "deqntk solve: warning: --ridge is deprecated; use --ridges"
    assert len(err) == 2 and err[1].startswith("deqntk solve: error: kernel store not found")


def test_run_kernel_means_the_regression_kernel():
    args, warned = _parse(["run", "--workdir", "w", "--kernel", "nngp", "--model", "cdeq"])
    assert (args.kernel, args.model, warned) == ("nngp", "cdeq", [])
    with pytest.raises(SystemExit):
        _parse(["run", "--workdir", "w", "--kernel", "cntk"])


def test_options_are_built_from_the_flags():
    args, _ = _parse(
        ["compute", DS, KS, "--kernels", "ntk", "--tile", "64", "--memory-budget", "64MiB",
         "--task-threads", "0", "--max-tiles", "3", "--layout", "1", "--no-progress"]
    )  # fmt: skip
    assert compute_options_from_args(args) == ComputeOptions(
        kernels=("ntk",), tile=64, memory_budget=64 * 2**20, task_threads=None, max_tiles=3,
        layout=1, progress=False,
    )  # fmt: skip
    args, _ = _parse(
        ["solve", KS, "--kernel", "nngp", "--ridges", "1e-2", "--solver", "cg",
         "--memory-limit", "2GB", "--band-memory", "8MiB", "--stream-bands", "--rank", "64"]
    )  # fmt: skip
    assert solve_options_from_args(args, kernel=args.kernel, full=True) == SolveOptions(
        kernel="nngp", ridges=(1e-2,), solver="cg", memory_limit=2 * 10**9,
        band_bytes=8 * 2**20, keep_bands=False, rank=64,
    )  # fmt: skip
    # defaults of the CLI are the options' defaults
    args, _ = _parse(["solve", KS])
    assert solve_options_from_args(args, kernel=args.kernel, full=True) == SolveOptions()
    args, _ = _parse(["compute", DS, KS])
    assert compute_options_from_args(args) == ComputeOptions()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["solve", KS, "--memory-limit", "1G"], "argument --memory-limit: has the ambiguous unit"),
        (["solve", KS, "--band-memory", "1000"], "argument --band-memory: must be at least 1 MiB"),
        (["compute", DS, KS, "--memory-budget", "lots"], "argument --memory-budget: must be a "
         "size such as 16GB"),
        (["compute", DS, KS, "--kernels", "ntk,cntk"], "argument --kernels: must be ntk, nngp"),
        (["solve", KS, "--ridges", "a,b"], "argument --ridges: must be a comma list"),
    ],
)  # fmt: skip
def test_bad_sizes_and_lists_name_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_library_errors_name_the_flags(tmp_path, capsys):
    """A bad value that passes argparse is refused by the options, and the message names
    the flag, not the Python parameter."""
    assert main(["compute", str(tmp_path / "ds"), str(tmp_path / "ks"), "--tile", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tile must be an integer >= 1, got 0" in err, err
    assert main(["solve", str(tmp_path / "ks"), "--val-fraction", "0.9"]) == 2
    assert "--val-fraction must be a finite number in (0, 0.5]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "message, expected",
    [
        ("pass overwrite=True to redo it", "pass --overwrite to redo it"),
        ("or pass write_results=False", "or pass --no-write"),
        ("pass allow_incomplete=True to solve", "pass --allow-incomplete to solve"),
        ("memory_budget must be at least 1 MiB", "--memory-budget must be at least 1 MiB"),
        ("tile must be an integer >= 1", "--tile must be an integer >= 1"),
        ("and pass it as source=DIR", "and pass it as --source=DIR"),
        ("use tile=4096 or larger", "use --tile=4096 or larger"),
        ("or pass recompute_mismatched=True to", "or pass --recompute-mismatched to"),
        ("tile (0, 1) rows [0, 8) failed", "tile (0, 1) rows [0, 8) failed"),
        ("the tile side is too small", "the tile side is too small"),
        ("kernel store /data/tile_a must be", "kernel store /data/tile_a must be"),
    ],
)
def test_flag_hints(message, expected):
    assert flag_hints(message) == expected
