"""The admin socket protocol: JSON lines, one clear error for anything malformed."""

from __future__ import annotations

import pytest

from volume_core import admin
from volume_core.errors import AdminError, SnapshotError

pytestmark = pytest.mark.unit


@pytest.fixture
def server(tmp_path):
    def boom():
        raise SnapshotError("no snapshot named 'x'")

    srv = admin.AdminServer(tmp_path / "a.sock", {"echo": lambda **kw: kw, "boom": boom,
                                                   "crash": lambda: 1 / 0})
    srv.start()
    yield srv
    srv.close()


def test_round_trip(server):
    assert admin.call(server.path, "echo", a=1, b=[2]) == {"a": 1, "b": [2]}


@pytest.mark.parametrize("line, message", [
    (b"not json\n", "malformed admin request"),
    (b"[1, 2]\n", "malformed admin request"),
    (b'{"no_op": 1}\n', "malformed admin request"),
    (b'{"op": "nope"}\n', "unknown admin operation"),
    (b'{"op": "boom", "extra": 1}\n', "bad arguments"),
    (b'{"op": "boom"}\n', "no snapshot named"),
    (b'{"op": "crash"}\n', "ZeroDivisionError"),
])
def test_malformed_and_failing_requests_get_one_error(server, line, message):
    reply = server.dispatch(line)
    assert reply["ok"] is False and message in reply["error"]
    assert "\n" not in reply["error"]


def test_call_errors_are_typed(tmp_path, server):
    with pytest.raises(AdminError, match="no server is listening"):
        admin.call(tmp_path / "missing.sock", "echo")
    with pytest.raises(AdminError, match="no snapshot named"):
        admin.call(server.path, "boom")


def test_long_socket_paths_work(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    srv = admin.AdminServer(deep / "admin.sock", {"ping": lambda: "pong"})
    srv.start()
    try:
        assert len(str(deep / "admin.sock")) > 108
        assert admin.call(deep / "admin.sock", "ping") == "pong"
    finally:
        srv.close()
