"""Fixtures the link's tests share, defined in test_link.py: a listening ``secondary``
and a ``primary`` channel dialling it, each closed after the test."""

from tests.integration.test_link import primary, secondary  # noqa: F401 - fixtures
