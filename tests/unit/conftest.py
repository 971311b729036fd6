"""Fixtures the secondary's tests share, defined in test_secondary.py: a secondary
``volume`` and its replica ``engine``; in test_attack_async.py: a ``secondary`` replica
engine of the async tests' size; in test_attack_session8.py: a ``replica`` engine whose
last region is short."""

from tests.unit.test_attack_async import secondary  # noqa: F401 - fixture
from tests.unit.test_attack_session8 import replica  # noqa: F401 - fixture
from tests.unit.test_secondary import engine, volume  # noqa: F401 - fixtures
