import pytest

from volume_core.errors import UsageError
from volume_core.units import format_size, parse_size

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, value", [
    ("512", 512), ("64K", 65536), ("64k", 65536), ("64KiB", 65536), ("1M", 1 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("1.5G", 3 << 29), (" 4M ", 4 << 20), ("8MB", 8 << 20),
])
def test_parse_size_accepts_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1.3", "1.0000001K", "K", "1X", "1 2", "0x10"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size():
    assert format_size(65536) == "64 KiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(100) == "100 B"
