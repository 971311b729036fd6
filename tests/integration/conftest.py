"""Fixtures shared across files: from test_link.py a listening ``secondary`` and a
``primary`` channel dialling it; from test_replication_cli_faults.py ``mirror`` (a
``receive`` process and a primary volume); from test_async_cli.py ``consistent`` (an
export of a secondary's consistent images); each cleaned up after the test."""

from tests.integration.test_async_cli import consistent  # noqa: F401 - fixture
from tests.integration.test_link import primary, secondary  # noqa: F401 - fixtures
from tests.integration.test_replication_cli_faults import mirror  # noqa: F401 - fixture
