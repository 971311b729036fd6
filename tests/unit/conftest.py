"""Fixtures the secondary's tests share, defined in test_secondary.py: a secondary
``volume`` and its replica ``engine``."""

from tests.unit.test_secondary import engine, volume  # noqa: F401 - fixtures
