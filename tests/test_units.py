"""The one size parser behind every memory option (library and CLI)."""

import pytest

from deqntk_dist.errors import InputError
from deqntk_dist.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        (4096, 4096),
        (2e9, 2_000_000_000),
        ("2e9", 2_000_000_000),
        ("512B", 512),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("16MB", 16_000_000),
        ("16MiB", 16 * 2**20),
        ("1GB", 10**9),
        ("1gb", 10**9),
        ("1GiB", 2**30),
        ("1 GiB", 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        (" 2TB ", 2 * 10**12),
        ("1TiB", 2**40),
        (".5MiB", 2**19),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value, needle",
    [
        ("1G", "ambiguous unit 'G'"),
        ("512m", "ambiguous unit 'm'"),
        ("1GBs", "unknown unit 'GBs'"),
        ("1PB", "unknown unit 'PB'"),
        ("lots", "must be a size such as 16GB"),
        ("", "must be a size"),
        ("-1GB", "must be a size"),
        ("1e999", "finite"),
        (float("nan"), "finite"),
        (0, "at least 1 B"),
        (True, "must be a size"),
        ([1], "must be a size"),
    ],
)
def test_bad_sizes_name_the_parameter(value, needle):
    with pytest.raises(InputError, match="memory_limit") as e:
        parse_size(value, param="memory_limit")
    assert needle in str(e.value) and isinstance(e.value, ValueError)


def test_minimum_and_format():
    with pytest.raises(InputError, match=r"--band-memory must be at least 1 MiB, got '10'"):
        parse_size("10", param="--band-memory", minimum=2**20)
    assert parse_size("1MiB", minimum=2**20) == 2**20
    assert format_size(3 * 2**29) == "1.5 GiB" and format_size(100) == "100 B"
