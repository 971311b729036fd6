"""click parameter types: a bad value is a usage error (exit 2) with one clear line."""

from __future__ import annotations

from collections.abc import Callable

import click

from volume_core.errors import UsageError
from volume_core.units import parse_size
from volume_core.volume import validate_region_size, validate_size


class Size(click.ParamType):
    """A byte size such as ``512M`` or ``10G``, checked by ``check`` (raises UsageError)."""

    name = "size"

    def __init__(self, what: str, check: Callable[[int], None] | None = None) -> None:
        self.what = what
        self.check = check

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(value, self.what)
            if self.check is not None:
                self.check(size)
        except UsageError as err:
            self.fail(str(err), param, ctx)
        return size


VOLUME_SIZE = Size("size", validate_size)
REGION_SIZE = Size("region size", validate_region_size)
