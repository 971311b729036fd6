"""The replication wire protocol between a primary and a secondary — frames, no I/O.

Written sans-I/O like h11: frames are small frozen dataclasses; ``encode``
turns one into bytes; a ``Decoder`` takes bytes in (``receive_data``) and
hands frames out (``next_frame``); a ``Connection`` adds the handshake state
machine and who-may-send-what. Nothing here opens a socket, starts a thread,
reads a clock or touches a file: ``link.py`` does that.

Every frame is a 40-byte little-endian header, then ``payload_len`` bytes:

    ======  ====  ===========  ======================================================
    offset  size  field        meaning
    ======  ====  ===========  ======================================================
         0     4  magic        b"NBMR"
         4     1  type         frame type (table below); unknown types are refused
         5     1  flags        per-type bits: 0x01 FUA, 0x02 MAY_TRIM, 0x04 FAILED,
                               0x08 END, 0x30 META kind (0 write, 1 trim, 2 zero);
                               others 0
         6     2  reserved     must be 0
         8     8  seq          sequence number (writes), request id, token or cycle
        16     8  offset       byte offset in the volume (0 where unused)
        24     4  length       bytes of the volume concerned, or a count (0 if unused)
        28     4  payload_len  bytes that follow the header
        32     4  payload_crc  crc32c of the payload (0 for no payload)
        36     4  header_crc   crc32c of header bytes 0..35
    ======  ====  ===========  ======================================================

The header has its own crc so that a damaged ``payload_len`` is caught at once,
before the decoder waits for (or buffers) a payload that is not coming.

    ====  ============  ====  ================================================  ==========
    type  name          from  header fields / payload                           answer
    ====  ============  ====  ================================================  ==========
    0x01  HELLO         P     JSON: version, role, uuid, size, region_size,     HELLO_REPLY
                              generation, mode, nonce (hex), auth
    0x02  HELLO_REPLY   S     JSON: accepted, reason, the secondary's identity
                              (as HELLO) and its nonce
    0x03  AUTH          P S   payload: 32-byte HMAC-SHA256 (see auth.py);
                              the primary's first, then the secondary's
    0x04  MARKED_RUNS   S     payload: u64 first region, u64 count pairs (at
                              most 1024), ascending, inside the volume: the
                              secondary's marks; END flag: the last one
    0x10  WRITE         P     seq, offset, length; payload = data (len==length)  DATA_ACK
    0x11  META          P     seq, offset, length, kind in flags; no payload     META_ACK
    0x12  DATA          P     seq, offset, length of an earlier META write;      DATA_ACK
                              payload = data
    0x13  TRIM          P     seq, offset, length                                DATA_ACK
    0x14  ZERO          P     seq, offset, length; MAY_TRIM: holes allowed       DATA_ACK
    0x15  FLUSH         P     seq                                                FLUSH_ACK
    0x16  WRITEV        P     seq, length = n extents (1..MAX_EXTENTS); payload  DATA_ACK
                              = n (u64 offset, u64 length) pairs, ascending,
                              not overlapping, inside the volume, then their data
                              in that order (async cycles; always FUA)
    0x20  META_ACK      S     seq .. seq+length-1 (length = count >= 1)
    0x21  DATA_ACK      S     seq .. seq+length-1 are on the secondary's disk
    0x22  WRITE_FAILED  S     seq, offset, length: that write failed on the
                              secondary's disk; it recovers the range itself
    0x23  FLUSH_ACK     S     seq, once every write acknowledged before the FLUSH
                              (recoveries included) is durable there; FAILED
                              flag: the secondary's fdatasync failed
    0x30  READ_REGION   S     seq (request id), offset, length: whole regions    REGION_DATA
    0x31  REGION_DATA   P     seq (request id), offset, length: whole regions;
                              payload = their current contents
    0x32  RESYNC_BEGIN  P     seq; payload: u64 regions, u64 bytes to come
    0x33  RESYNC_END    P     seq; payload: u64 regions, u64 bytes sent
    0x40  PING          P S   seq = token                                        PONG
    0x41  PONG          P S   seq = the PING's token
    0x42  ERROR         P S   payload: UTF-8 reason (<= 4 KiB); the sender
                              then drops the connection
    0x50  CYCLE_BEGIN   P     seq = cycle number (async mirror)
    0x51  CYCLE_COMMIT  P     seq = cycle number: the cycle's image is complete; CYCLE_ACK
                              offset = its point in time (the take), in
                              microseconds since the Unix epoch (0: unknown)
    0x52  CYCLE_ACK     S     seq = cycle number, consistent on the secondary
    ====  ============  ====  ================================================  ==========

A META of kind trim or zero is complete in itself: no DATA follows it.
Before the handshake completes a frame's payload is at most 16 KiB and every
frame that names a range of the volume is refused; afterwards a data payload
is at most 32 MiB and every range must lie inside the volume.

Handshake: the primary sends HELLO; the secondary answers HELLO_REPLY
(``hello_problem`` decides whether it accepts). With a shared secret, the
primary then sends AUTH and the secondary, once that checks, sends its own
AUTH; the primary sends nothing else until the secondary's AUTH checks. Then
the secondary sends its marked runs (MARKED_RUNS frames, the last with END,
at least one): every region whose data may be missing on its disk, which the
primary must resync even where its own marks say the two match (a DATA_ACK
goes before the secondary's fdatasync, so its power loss can lose acknowledged
data). At most ``MAX_MARKED_RUNS`` runs in all: a sender with more joins the
closest ones (``coarsen_runs``; more regions resynced, never fewer). Both
sides are then READY for data frames. Any malformed or out-of-order input
raises ``ProtocolError`` and breaks the connection object for good; a
refusal or a failed authentication raises ``PeerRefused``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from typing import Any, ClassVar, Final

import numpy as np
from crc32c import crc32c

from ..errors import PeerRefused, ProtocolError
from . import auth

MAGIC: Final = b"NBMR"
#: 2: MARKED_RUNS ends the handshake. 3: WRITEV.
PROTOCOL_VERSION: Final = 3
HEADER: Final = struct.Struct("<4sBBHQQIIII")
HEADER_SIZE: Final = HEADER.size
_CRC_SPAN = struct.Struct("<4sBBHQQIII")  # the header bytes its crc covers
_U32 = struct.Struct("<I")
_COUNTS = struct.Struct("<QQ")
_RUN = struct.Struct("<QQ")  # a MARKED_RUNS run: first region, count
#: The largest data payload (nbdkit's largest request).
MAX_DATA: Final = 32 << 20
#: The largest payload before the handshake completes, and of any non-data frame.
MAX_SMALL_PAYLOAD: Final = 16 << 10
MAX_REASON: Final = 4096
#: a time a frame carries (microseconds since the Unix epoch) is below this (year 5138;
#: state_files.MAX_UNIX_TIME, in seconds, for what is recorded of it)
MAX_TIME_US: Final = 10**17
#: Extents in one WRITEV frame, at most.
MAX_EXTENTS: Final = 1024
_EXTENT_SIZE: Final = 16  # u64 offset, u64 length
#: Runs in one MARKED_RUNS frame, and in one handshake (a sender joins runs to fit).
RUNS_PER_FRAME: Final = MAX_SMALL_PAYLOAD // _RUN.size
MAX_MARKED_RUNS: Final = 64 * RUNS_PER_FRAME
MODES: Final = ("sync", "semi-async", "async")
#: Payloads this large that end a receive buffer are handed out without a copy.
_HANDOFF_MIN = 64 << 10
_COMPACT_AT = 1 << 20

FLAG_FUA: Final = 0x01
FLAG_MAY_TRIM: Final = 0x02
FLAG_FAILED: Final = 0x04
FLAG_END: Final = 0x08
_KIND_SHIFT = 4
_KIND_MASK = 0x30

Buffer = bytes | bytearray | memoryview


class Role(enum.StrEnum):
    """Which end of a replication connection."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class WriteKind(enum.IntEnum):
    """What a META announces."""

    WRITE = 0
    TRIM = 1
    ZERO = 2


class NeedData:
    """The sentinel ``next_frame`` returns when the buffered bytes hold no whole frame."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class PeerClosed:
    """The sentinel ``next_frame`` returns once the peer closed cleanly between frames."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PEER_CLOSED"


NEED_DATA: Final = NeedData()
PEER_CLOSED: Final = PeerClosed()


# ---------------------------------------------------------------------------------- frames

_frozen = dataclasses.dataclass(frozen=True, slots=True)
# What a frame puts in the header: flags, seq, offset, length, payload.
_Parts = tuple[int, int, int, int, Buffer]


class Frame:
    """Base of every frame. ``CODE`` is its wire type."""

    __slots__ = ()
    CODE: ClassVar[int]

    def _pack(self) -> _Parts:
        raise NotImplementedError

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Frame:
        raise NotImplementedError


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _json_fields(payload: Buffer, fields: dict[str, type], what: str) -> dict[str, Any]:
    """Parse a JSON object and check that each named field is there with its type."""
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{what} payload is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload is not a JSON object")
    out = {}
    for name, kind in fields.items():
        value = obj.get(name)
        # bool is an int in Python; on the wire they must not stand in for each other.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{what} field {name!r} is missing or not a {kind.__name__}")
        out[name] = value
    return out


def _nonce_from_hex(text: str, what: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if len(nonce) != auth.NONCE_SIZE:
        raise ProtocolError(f"{what} nonce is not {auth.NONCE_SIZE} bytes of hex")
    return nonce


_IDENTITY_FIELDS: dict[str, type] = {
    "version": int, "role": str, "uuid": str, "size": int, "region_size": int,
    "generation": int, "nonce": str, "auth": bool,
}


@_frozen
class Hello(Frame):
    """The primary's opening frame: who it is and what it wants to replicate."""

    CODE: ClassVar[int] = 0x01
    version: int
    role: str
    uuid: str
    size: int
    region_size: int
    generation: int
    mode: str
    nonce: bytes
    auth: bool

    def _pack(self) -> _Parts:
        obj = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        obj["nonce"] = self.nonce.hex()
        return 0, 0, 0, 0, _json_bytes(obj)

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Hello:
        obj = _json_fields(payload, {**_IDENTITY_FIELDS, "mode": str}, "HELLO")
        obj["nonce"] = _nonce_from_hex(obj["nonce"], "HELLO")
        return cls(**obj)


@_frozen
class HelloReply(Frame):
    """The secondary's answer to HELLO: accepted or not (with a reason), and who it is."""

    CODE: ClassVar[int] = 0x02
    accepted: bool
    reason: str
    version: int
    role: str
    uuid: str
    size: int
    region_size: int
    generation: int
    nonce: bytes
    auth: bool

    def _pack(self) -> _Parts:
        obj = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        obj["nonce"] = self.nonce.hex()
        return 0, 0, 0, 0, _json_bytes(obj)

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int,
                payload: Buffer) -> HelloReply:
        fields = {**_IDENTITY_FIELDS, "accepted": bool, "reason": str}
        obj = _json_fields(payload, fields, "HELLO_REPLY")
        obj["nonce"] = _nonce_from_hex(obj["nonce"], "HELLO_REPLY")
        return cls(**obj)


@_frozen
class Auth(Frame):
    """Proof that the sender knows the shared secret (see auth.py)."""

    CODE: ClassVar[int] = 0x03
    mac: bytes

    def _pack(self) -> _Parts:
        return 0, 0, 0, 0, self.mac

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Auth:
        return cls(bytes(payload))


def _check_runs(runs: tuple[tuple[int, int], ...], reach: int = 0,
                regions: int | None = None) -> int:
    """ProtocolError unless ``runs`` ascend from ``reach`` without overlapping, each of at
    least one region (inside ``regions`` if given); returns where the last one ends."""
    for first, count in runs:
        if first < reach or count < 1:
            raise ProtocolError(f"MARKED_RUNS run {first}+{count} is empty, overlaps or comes "
                                f"before region {reach}: runs must ascend")
        reach = first + count
        if regions is not None and reach > regions:
            raise ProtocolError(f"MARKED_RUNS run {first}+{count} reaches past the end of the "
                                f"volume ({regions} regions)")
        if reach >= 1 << 64:
            raise ProtocolError(f"MARKED_RUNS run {first}+{count} is out of range")
    return reach


@_frozen
class MarkedRuns(Frame):
    """Regions whose data may be missing on the secondary, as (first region, count) runs.

    Sent by the secondary at the end of the handshake, in as many frames as
    its runs need (``Connection.marked_runs_frames``); ``end`` on the last.
    """

    CODE: ClassVar[int] = 0x04
    runs: tuple[tuple[int, int], ...] = ()
    end: bool = True

    def _pack(self) -> _Parts:
        if len(self.runs) > RUNS_PER_FRAME:
            raise ProtocolError(f"{len(self.runs)} runs in one MARKED_RUNS frame (at most "
                                f"{RUNS_PER_FRAME})")
        _check_runs(self.runs)
        payload = b"".join(_RUN.pack(first, count) for first, count in self.runs)
        return FLAG_END if self.end else 0, 0, 0, 0, payload

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int,
                payload: Buffer) -> MarkedRuns:
        if len(payload) % _RUN.size:
            raise ProtocolError(f"MARKED_RUNS payload of {len(payload)} bytes is not whole "
                                f"runs of {_RUN.size} bytes")
        runs = tuple(_RUN.iter_unpack(payload))
        _check_runs(runs)
        return cls(runs, bool(flags & FLAG_END))


def coarsen_runs(runs: Any, limit: int = MAX_MARKED_RUNS) -> np.ndarray:
    """At most ``limit`` (first, count) rows covering every region of ``runs`` (ascending,
    disjoint): where there are more, the runs closest to each other are joined, the
    regions between them added (resynced for nothing, never missed)."""
    rows = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    n = len(rows)
    if n <= max(1, limit):
        return rows
    starts, ends = rows[:, 0], rows[:, 0] + rows[:, 1]
    joined = np.zeros(n - 1, dtype=bool)
    joined[np.argsort(starts[1:] - ends[:-1], kind="stable")[:n - limit]] = True
    begins = np.flatnonzero(np.concatenate(([True], ~joined)))  # rows that start a run
    lasts = np.concatenate((begins[1:] - 1, [n - 1]))  # and the row that ends it
    return np.stack((starts[begins], ends[lasts] - starts[begins]), axis=1)


@_frozen
class Write(Frame):
    """A whole write, data included (sync mode, and resync)."""

    CODE: ClassVar[int] = 0x10
    seq: int
    offset: int
    data: Buffer
    fua: bool = False

    @property
    def length(self) -> int:
        return len(self.data)

    def _pack(self) -> _Parts:
        return FLAG_FUA if self.fua else 0, self.seq, self.offset, len(self.data), self.data

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Write:
        return cls(seq, offset, payload, bool(flags & FLAG_FUA))


@_frozen
class WriteV(Frame):
    """Scattered ranges written as one frame (async cycles): one header, one answer.

    ``payload`` is the wire payload: ``count`` extents (u64 offset, u64 length),
    ascending and not overlapping, then their data in that order. A sender may build
    it in place (``table``) and read the data in behind it: nothing is copied.
    """

    CODE: ClassVar[int] = 0x16
    seq: int
    count: int
    payload: Buffer

    @staticmethod
    def table_size(count: int) -> int:
        """Bytes of the extent table of ``count`` extents (the data follows it)."""
        return _EXTENT_SIZE * count

    @staticmethod
    def table(buf: Buffer, count: int) -> np.ndarray:
        """The extents of a payload as a (count, 2) array (a view: writable if ``buf`` is)."""
        return np.frombuffer(buf, dtype="<u8", count=2 * count).reshape(count, 2)

    @classmethod
    def of(cls, seq: int, extents: Any, data: Buffer) -> WriteV:
        """A frame of ``extents`` ((offset, length) rows) and their ``data`` (copied)."""
        rows = np.asarray(extents, dtype="<u8").reshape(-1, 2)
        return cls(seq, len(rows), rows.tobytes() + bytes(data))

    @property
    def extents(self) -> np.ndarray:
        """(offset, length) rows, int64."""
        return self.table(self.payload, self.count).astype(np.int64)

    @property
    def data(self) -> memoryview:
        return memoryview(self.payload)[_EXTENT_SIZE * self.count:]

    @property
    def length(self) -> int:
        """Bytes of the volume it writes (its data)."""
        return len(self.payload) - _EXTENT_SIZE * self.count

    @property
    def span(self) -> tuple[int, int]:
        """(offset, length) from the first extent's start to the last one's end."""
        rows = self.table(self.payload, self.count)
        return int(rows[0, 0]), int(rows[-1, 0] + rows[-1, 1] - rows[0, 0])

    def _pack(self) -> _Parts:
        _check_extents(self.table(self.payload, self.count), len(self.payload))
        return FLAG_FUA, self.seq, 0, self.count, self.payload

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> WriteV:
        _check_extents(cls.table(payload, length), len(payload))
        return cls(seq, length, payload)


def extents_problem(rows: np.ndarray, data_len: int) -> str | None:
    """What is wrong with WRITEV extents ((offset, length) rows as read from the wire or
    a staging log: uint64), or None: each non-empty and at most ``MAX_DATA`` bytes,
    ascending and not overlapping (they may touch), ``data_len`` bytes in all."""
    offsets, lengths = rows[:, 0], rows[:, 1]
    if not rows.size or not lengths.all() or int(lengths.max()) > MAX_DATA:
        return "has an empty extent, or one over the data limit"
    if int(offsets.max()) >= 1 << 62:  # (so that no end below overflows)
        return "has an extent out of range"
    ends = offsets + lengths
    if (offsets[1:] < ends[:-1]).any():
        return "extents overlap or do not ascend"
    if int(lengths.sum()) != data_len:
        return f"extents hold {int(lengths.sum())} bytes of data; its payload carries {data_len}"
    return None


def _check_extents(rows: np.ndarray, payload_len: int) -> None:
    """ProtocolError unless a WRITEV frame's extents are right (``extents_problem``) for
    the data that follows their table in its payload."""
    problem = extents_problem(rows, payload_len - _EXTENT_SIZE * len(rows))
    if problem is not None:
        raise ProtocolError(f"WRITEV frame {problem}")


def _check_extents_inside(frame: Frame, size: int | None) -> None:
    """ProtocolError if a WRITEV frame reaches past the end of the volume."""
    if isinstance(frame, WriteV):
        offset, length = frame.span
        if size is None or offset + length > size:
            raise ProtocolError(f"WRITEV frame range {offset}+{length} reaches past the end "
                                f"of the volume ({size} bytes)")


@_frozen
class Meta(Frame):
    """Semi-async: a write's metadata, sent ahead of its data so the ack never waits for it."""

    CODE: ClassVar[int] = 0x11
    seq: int
    offset: int
    length: int
    kind: WriteKind = WriteKind.WRITE
    fua: bool = False
    may_trim: bool = False

    def _pack(self) -> _Parts:
        flags = (self.kind << _KIND_SHIFT) | (FLAG_FUA if self.fua else 0) | (
            FLAG_MAY_TRIM if self.may_trim else 0)
        return flags, self.seq, self.offset, self.length, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Meta:
        kind = (flags & _KIND_MASK) >> _KIND_SHIFT
        if kind > WriteKind.ZERO:
            raise ProtocolError(f"META kind {kind} is unknown")
        if flags & FLAG_MAY_TRIM and kind != WriteKind.ZERO:
            raise ProtocolError("META flag MAY_TRIM is only allowed on kind zero")
        return cls(seq, offset, length, WriteKind(kind), bool(flags & FLAG_FUA),
                   bool(flags & FLAG_MAY_TRIM))


@_frozen
class Data(Frame):
    """Semi-async: the data of an earlier META (same seq, offset and length)."""

    CODE: ClassVar[int] = 0x12
    seq: int
    offset: int
    data: Buffer

    @property
    def length(self) -> int:
        return len(self.data)

    def _pack(self) -> _Parts:
        return 0, self.seq, self.offset, len(self.data), self.data

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Data:
        return cls(seq, offset, payload)


@_frozen
class Trim(Frame):
    CODE: ClassVar[int] = 0x13
    seq: int
    offset: int
    length: int
    fua: bool = False

    def _pack(self) -> _Parts:
        return FLAG_FUA if self.fua else 0, self.seq, self.offset, self.length, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Trim:
        return cls(seq, offset, length, bool(flags & FLAG_FUA))


@_frozen
class Zero(Frame):
    CODE: ClassVar[int] = 0x14
    seq: int
    offset: int
    length: int
    may_trim: bool = True
    fua: bool = False

    def _pack(self) -> _Parts:
        flags = (FLAG_FUA if self.fua else 0) | (FLAG_MAY_TRIM if self.may_trim else 0)
        return flags, self.seq, self.offset, self.length, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Zero:
        return cls(seq, offset, length, bool(flags & FLAG_MAY_TRIM), bool(flags & FLAG_FUA))


@_frozen
class _SeqFrame(Frame):
    """A frame that carries only a number in ``seq``."""

    seq: int

    def _pack(self) -> _Parts:
        return 0, self.seq, 0, 0, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Frame:
        return cls(seq)


@_frozen
class Flush(_SeqFrame):
    CODE: ClassVar[int] = 0x15


@_frozen
class _AckFrame(Frame):
    """Acknowledges ``count`` consecutive sequence numbers from ``seq``."""

    seq: int
    count: int = 1

    def _pack(self) -> _Parts:
        return 0, self.seq, 0, self.count, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Frame:
        return cls(seq, length)


@_frozen
class MetaAck(_AckFrame):
    CODE: ClassVar[int] = 0x20


@_frozen
class DataAck(_AckFrame):
    CODE: ClassVar[int] = 0x21


@_frozen
class _RangeFrame(Frame):
    """A sequence number (or request id) and a range of the volume; no payload."""

    seq: int
    offset: int
    length: int

    def _pack(self) -> _Parts:
        return 0, self.seq, self.offset, self.length, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Frame:
        return cls(seq, offset, length)


@_frozen
class WriteFailed(_RangeFrame):
    """The secondary's disk write for ``seq`` failed; it will recover the range itself."""

    CODE: ClassVar[int] = 0x22


@_frozen
class FlushAck(Frame):
    CODE: ClassVar[int] = 0x23
    seq: int
    failed: bool = False

    def _pack(self) -> _Parts:
        return FLAG_FAILED if self.failed else 0, self.seq, 0, 0, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> FlushAck:
        return cls(seq, bool(flags & FLAG_FAILED))


@_frozen
class ReadRegion(_RangeFrame):
    """The secondary asks for the current contents of whole regions (to recover them)."""

    CODE: ClassVar[int] = 0x30


@_frozen
class RegionData(Frame):
    """The answer to READ_REGION ``seq``: the regions' current contents."""

    CODE: ClassVar[int] = 0x31
    seq: int
    offset: int
    data: Buffer

    @property
    def length(self) -> int:
        return len(self.data)

    def _pack(self) -> _Parts:
        return 0, self.seq, self.offset, len(self.data), self.data

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int,
                payload: Buffer) -> RegionData:
        return cls(seq, offset, payload)


@_frozen
class _CountsFrame(Frame):
    seq: int
    regions: int
    nbytes: int

    def _pack(self) -> _Parts:
        return 0, self.seq, 0, 0, _COUNTS.pack(self.regions, self.nbytes)

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Frame:
        return cls(seq, *_COUNTS.unpack(payload))


@_frozen
class ResyncBegin(_CountsFrame):
    """A resync starts: ``regions`` regions, ``nbytes`` bytes will follow."""

    CODE: ClassVar[int] = 0x32


@_frozen
class ResyncEnd(_CountsFrame):
    """A resync ended: ``regions`` regions, ``nbytes`` bytes were sent."""

    CODE: ClassVar[int] = 0x33


@_frozen
class Ping(_SeqFrame):
    CODE: ClassVar[int] = 0x40


@_frozen
class Pong(_SeqFrame):
    CODE: ClassVar[int] = 0x41


@_frozen
class Error(Frame):
    """Why the sender is about to drop the connection."""

    CODE: ClassVar[int] = 0x42
    reason: str

    def _pack(self) -> _Parts:
        raw = self.reason.encode("utf-8", "replace")
        if len(raw) > MAX_REASON:  # cut on a character boundary
            raw = raw[:MAX_REASON].decode("utf-8", "ignore").encode()
        return 0, 0, 0, 0, raw

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int, payload: Buffer) -> Error:
        try:
            return cls(bytes(payload).decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("ERROR reason is not UTF-8") from None


@_frozen
class CycleBegin(_SeqFrame):
    """Async mirror: cycle ``seq`` starts (reserved for mirror.py)."""

    CODE: ClassVar[int] = 0x50


@_frozen
class CycleCommit(Frame):
    """Async mirror: every region of cycle ``seq`` was sent; ``taken_us``: the time of its
    take on the primary (microseconds since the Unix epoch, 0 when unknown)."""

    CODE: ClassVar[int] = 0x51
    seq: int
    taken_us: int = 0

    def _pack(self) -> _Parts:
        return 0, self.seq, self.taken_us, 0, b""

    @classmethod
    def _unpack(cls, flags: int, seq: int, offset: int, length: int,
                payload: Buffer) -> CycleCommit:
        return cls(seq, offset)


@_frozen
class CycleAck(_SeqFrame):
    """Async mirror: the secondary holds cycle ``seq`` as a consistent image."""

    CODE: ClassVar[int] = 0x52


# ------------------------------------------------------------------------ what each type allows


class _Payload(enum.Enum):
    NONE = "none"  # payload_len == 0
    DATA = "data"  # payload_len == length
    FIXED = "fixed"  # payload_len == _Spec.size
    SMALL = "small"  # payload_len <= MAX_SMALL_PAYLOAD
    EXTENTS = "extents"  # length extents, then at most MAX_DATA bytes of their data


class _Range(enum.Enum):
    NONE = "none"  # offset == 0 and length == 0
    COUNT = "count"  # offset == 0, length >= 1 is a count
    EXTENTS = "extents"  # COUNT of at most MAX_EXTENTS, after the handshake
    TIME = "time"  # offset is a time (below MAX_TIME_US), length == 0
    VOLUME = "volume"  # 0 < length, offset + length <= volume size
    REGIONS = "regions"  # VOLUME, and whole regions (the short last one included)


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"  # HELLO, HELLO_REPLY, AUTH: their own rules
    ANY = "any"  # ERROR
    READY = "ready"  # everything else: only after the handshake


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    cls: type[Frame]
    name: str
    payload: _Payload
    range: _Range
    senders: frozenset[Role]
    flags: int = 0
    size: int = 0
    phase: _Phase = _Phase.READY


_P = frozenset({Role.PRIMARY})
_S = frozenset({Role.SECONDARY})
_PS = frozenset({Role.PRIMARY, Role.SECONDARY})
_SPECS: tuple[_Spec, ...] = (
    _Spec(Hello, "HELLO", _Payload.SMALL, _Range.NONE, _P, phase=_Phase.HANDSHAKE),
    _Spec(HelloReply, "HELLO_REPLY", _Payload.SMALL, _Range.NONE, _S, phase=_Phase.HANDSHAKE),
    _Spec(Auth, "AUTH", _Payload.FIXED, _Range.NONE, _PS, size=auth.MAC_SIZE,
          phase=_Phase.HANDSHAKE),
    _Spec(MarkedRuns, "MARKED_RUNS", _Payload.SMALL, _Range.NONE, _S, FLAG_END,
          phase=_Phase.HANDSHAKE),
    _Spec(Write, "WRITE", _Payload.DATA, _Range.VOLUME, _P, FLAG_FUA),
    _Spec(Meta, "META", _Payload.NONE, _Range.VOLUME, _P, FLAG_FUA | FLAG_MAY_TRIM | _KIND_MASK),
    _Spec(Data, "DATA", _Payload.DATA, _Range.VOLUME, _P),
    _Spec(Trim, "TRIM", _Payload.NONE, _Range.VOLUME, _P, FLAG_FUA),
    _Spec(Zero, "ZERO", _Payload.NONE, _Range.VOLUME, _P, FLAG_FUA | FLAG_MAY_TRIM),
    _Spec(Flush, "FLUSH", _Payload.NONE, _Range.NONE, _P),
    _Spec(WriteV, "WRITEV", _Payload.EXTENTS, _Range.EXTENTS, _P, FLAG_FUA),
    _Spec(MetaAck, "META_ACK", _Payload.NONE, _Range.COUNT, _S),
    _Spec(DataAck, "DATA_ACK", _Payload.NONE, _Range.COUNT, _S),
    _Spec(WriteFailed, "WRITE_FAILED", _Payload.NONE, _Range.VOLUME, _S),
    _Spec(FlushAck, "FLUSH_ACK", _Payload.NONE, _Range.NONE, _S, FLAG_FAILED),
    _Spec(ReadRegion, "READ_REGION", _Payload.NONE, _Range.REGIONS, _S),
    _Spec(RegionData, "REGION_DATA", _Payload.DATA, _Range.REGIONS, _P),
    _Spec(ResyncBegin, "RESYNC_BEGIN", _Payload.FIXED, _Range.NONE, _P, size=_COUNTS.size),
    _Spec(ResyncEnd, "RESYNC_END", _Payload.FIXED, _Range.NONE, _P, size=_COUNTS.size),
    _Spec(Ping, "PING", _Payload.NONE, _Range.NONE, _PS),
    _Spec(Pong, "PONG", _Payload.NONE, _Range.NONE, _PS),
    _Spec(Error, "ERROR", _Payload.SMALL, _Range.NONE, _PS, phase=_Phase.ANY),
    _Spec(CycleBegin, "CYCLE_BEGIN", _Payload.NONE, _Range.NONE, _P),
    _Spec(CycleCommit, "CYCLE_COMMIT", _Payload.NONE, _Range.TIME, _P),
    _Spec(CycleAck, "CYCLE_ACK", _Payload.NONE, _Range.NONE, _S),
)
#: frame types with no sequence number (their seq field must be 0)
_SEQLESS: Final = frozenset({Hello, HelloReply, Auth, MarkedRuns, Error})
#: wire type -> spec (None: unknown type)
_BY_CODE: list[_Spec | None] = [None] * 256
for _spec in _SPECS:
    _BY_CODE[_spec.cls.CODE] = _spec
#: frame class -> spec
_BY_CLASS: dict[type[Frame], _Spec] = {spec.cls: spec for spec in _SPECS}
#: every frame type, by wire name (for tests and logs)
FRAME_TYPES: Final = {spec.name: spec.cls for spec in _SPECS}


def frame_name(frame: Frame | type[Frame]) -> str:
    """The wire name of a frame or frame class (``WRITE``, ``META_ACK``, ...)."""
    cls = frame if isinstance(frame, type) else type(frame)
    return _BY_CLASS[cls].name


def _check_header(spec: _Spec, flags: int, offset: int, length: int, payload_len: int,
                  size: int | None, region_size: int | None) -> None:
    """Everything the header alone tells about a frame of this type; ProtocolError if wrong."""
    name = spec.name
    if flags & ~spec.flags:
        raise ProtocolError(f"{name} frame has flags 0x{flags & ~spec.flags:02x} it may not have")
    _check_payload_len(spec, length, payload_len, size is not None)
    rng = spec.range
    if rng is _Range.NONE:
        if offset or length:
            raise ProtocolError(f"{name} frame has a nonzero offset or length")
    elif rng is _Range.TIME:
        if length:
            raise ProtocolError(f"{name} frame has a nonzero length")
        if offset >= MAX_TIME_US:
            raise ProtocolError(f"{name} frame carries an impossible time ({offset} us "
                                "since 1970)")
    elif rng is _Range.COUNT:
        if offset or not length:
            raise ProtocolError(f"{name} frame must have offset 0 and a count of at least 1")
    elif rng is _Range.EXTENTS:
        if size is None:
            raise ProtocolError(f"{name} frame before the handshake completed")
        if offset or not 0 < length <= MAX_EXTENTS:
            raise ProtocolError(f"{name} frame must have offset 0 and 1 to {MAX_EXTENTS} "
                                "extents")
    elif size is None or region_size is None:
        raise ProtocolError(f"{name} frame before the handshake completed")
    else:
        _check_range(name, offset, length, size, region_size, rng is _Range.REGIONS)


def _check_crc(payload: Buffer, expected: int, spec: _Spec) -> None:
    actual = crc32c(payload)
    if actual != expected:
        raise ProtocolError(f"{spec.name} frame payload checksum mismatch "
                            f"(0x{expected:08x}, computed 0x{actual:08x})")


def _check_payload_len(spec: _Spec, length: int, payload_len: int, ready: bool) -> None:
    name, rule = spec.name, spec.payload
    limit = MAX_DATA if ready and rule is _Payload.DATA else MAX_SMALL_PAYLOAD
    if rule is _Payload.EXTENTS:
        table = _EXTENT_SIZE * length
        if not table < payload_len <= table + MAX_DATA:
            raise ProtocolError(f"{name} frame payload of {payload_len} bytes is not "
                                f"{length} extents and at most {MAX_DATA} bytes of data")
        return
    if payload_len > limit:
        raise ProtocolError(f"{name} frame payload of {payload_len} bytes is over the "
                            f"limit of {limit}")
    if rule is _Payload.NONE and payload_len:
        raise ProtocolError(f"{name} frame has a payload of {payload_len} bytes; it takes none")
    if rule is _Payload.DATA and payload_len != length:
        raise ProtocolError(f"{name} frame payload of {payload_len} bytes does not match its "
                            f"length {length}")
    if rule is _Payload.FIXED and payload_len != spec.size:
        raise ProtocolError(f"{name} frame payload of {payload_len} bytes; it must be "
                            f"{spec.size}")


def _check_range(name: str, offset: int, length: int, size: int, region_size: int,
                 whole_regions: bool) -> None:
    if not length:
        raise ProtocolError(f"{name} frame has length 0")
    if offset + length > size:
        raise ProtocolError(f"{name} frame range {offset}+{length} reaches past the end of the "
                            f"volume ({size} bytes)")
    if whole_regions and length > MAX_DATA:  # the answer must fit in one frame
        raise ProtocolError(f"{name} frame asks for {length} bytes, more than one frame "
                            f"carries ({MAX_DATA})")
    if whole_regions and (offset % region_size or (length % region_size
                                                    and offset + length != size)):
        raise ProtocolError(f"{name} frame range {offset}+{length} is not whole regions of "
                            f"{region_size} bytes")


# -------------------------------------------------------------------------------- encoding


def encode_parts(frame: Frame) -> tuple[bytes, Buffer]:
    """The header and the payload of ``frame``, apart: ``sock.sendmsg([header, payload])``.

    The payload is the frame's own buffer, not a copy. Checks only what needs no
    connection state; ``Connection.send_parts`` checks the rest.
    """
    try:
        parts = frame._pack()
    except (AttributeError, TypeError, ValueError) as err:
        raise ProtocolError(f"cannot encode {frame!r}: {err}") from None
    return _encode(frame, *parts)


def _encode(frame: Frame, flags: int, seq: int, offset: int, length: int,
            payload: Buffer) -> tuple[bytes, Buffer]:
    payload_len = len(payload)
    try:
        head = _CRC_SPAN.pack(MAGIC, frame.CODE, flags, 0, seq, offset, length, payload_len,
                              crc32c(payload) if payload_len else 0)
    except (struct.error, TypeError) as err:
        raise ProtocolError(f"cannot encode {frame!r}: {err}") from None
    return head + _U32.pack(crc32c(head)), payload


def encode(frame: Frame) -> bytes:
    """``frame`` as one bytes object (copies the payload; see ``encode_parts``)."""
    head, payload = encode_parts(frame)
    return head + payload if len(payload) else head


# -------------------------------------------------------------------------------- decoding

# A parsed, checked header: spec, flags, seq, offset, length, payload_len, payload_crc.
_Head = tuple[_Spec, int, int, int, int, int, int]


class Decoder:
    """Turns a byte stream into frames, checking each one. No state beyond the framing.

    Feed it with ``receive_data`` (``b""`` means the peer closed), take frames
    with ``next_frame`` until it returns ``NEED_DATA``. It buffers at most one
    partial frame beyond what it was given. A reader may instead receive the
    rest of a large payload straight into ``receive_buffer()`` and report it
    with ``received(n)``: the payload is then handed out without a copy. After
    a ``ProtocolError`` it refuses all further use. Frames that name a range of
    the volume are refused until ``set_volume`` tells it the volume's geometry.
    """

    def __init__(self, size: int | None = None, region_size: int | None = None) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._head: _Head | None = None
        # The payload of the parsed header, once a reader asked for receive_buffer():
        # its bytes live here (the header is consumed from _buf), _filled of them so far.
        self._into: bytearray | None = None
        self._filled = 0
        self._eof = False
        self._failed: ProtocolError | None = None
        self.size = size
        self.region_size = region_size

    def set_volume(self, size: int, region_size: int) -> None:
        """From now on accept data frames, inside a volume of this geometry."""
        if size <= 0 or region_size <= 0 or region_size & (region_size - 1):
            raise ProtocolError(f"impossible volume geometry: size {size}, region size "
                                f"{region_size}")
        self.size, self.region_size = size, region_size

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        into = HEADER_SIZE + self._filled if self._into is not None else 0
        return len(self._buf) - self._pos + into

    def bytes_needed(self) -> int:
        """How many more bytes would complete the next frame (at least 1).

        A reader that receives exactly this many lets a large payload be handed
        out without a copy.
        """
        if self._into is not None:
            return max(1, len(self._into) - self._filled)
        head = self._head
        want = HEADER_SIZE + (head[5] if head is not None else 0)
        return max(1, want - self.buffered)

    def receive_buffer(self) -> memoryview | None:
        """Where the rest of a large payload may be received directly, or None.

        Between a parsed header and the end of its payload (of at least 64
        KiB), a reader may ``recv_into`` this buffer and then call
        ``received(n)``: no copy through the decoder's buffer. None otherwise:
        feed ``receive_data``.
        """
        self._refuse_if_failed()
        head = self._head
        if self._eof or head is None:
            return None
        if self._into is None:
            payload_len = head[5]
            start = self._pos + HEADER_SIZE
            have = len(self._buf) - start
            if payload_len < _HANDOFF_MIN or have >= payload_len:
                return None
            self._into = bytearray(payload_len)
            self._into[:have] = memoryview(self._buf)[start:]
            self._filled = have
            del self._buf[start:]
            self._consume(start)
        return memoryview(self._into)[self._filled:]

    def received(self, n: int) -> None:
        """``n`` (> 0) bytes were written at the start of ``receive_buffer()``."""
        self._refuse_if_failed()
        if self._into is None or not 0 < n <= len(self._into) - self._filled:
            raise ValueError(f"received({n}) without a receive buffer that takes it")
        self._filled += n

    def receive_data(self, data: Buffer) -> None:
        """Add bytes from the peer; ``b""`` says the peer closed its end."""
        self._refuse_if_failed()
        if not data:
            self._eof = True
        elif self._eof:
            self._fail("data received after the end of the stream")
        else:
            into = self._into
            if into is not None:  # a payload being received in place takes its part first
                take = min(len(data), len(into) - self._filled)
                with memoryview(data) as view:
                    into[self._filled:self._filled + take] = view[:take]
                    self._filled += take
                    self._buf += view[take:]
                return
            self._buf += data

    def next_frame(self) -> Frame | NeedData | PeerClosed:
        """The next whole frame, ``NEED_DATA``, or ``PEER_CLOSED`` at a clean end."""
        self._refuse_if_failed()
        try:
            return self._next()
        except ProtocolError as err:
            self._failed = err
            raise

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            raise ProtocolError(f"connection already failed: {self._failed}")

    def _fail(self, message: str) -> None:
        self._failed = ProtocolError(message)
        raise self._failed

    def _next(self) -> Frame | NeedData | PeerClosed:
        if self._into is not None:
            return self._next_received()
        buf, pos = self._buf, self._pos
        head = self._head
        if head is None:
            if len(buf) - pos < HEADER_SIZE:
                return self._short()
            head = self._head = self._parse_header(buf, pos)
        spec, flags, seq, offset, length, payload_len, payload_crc = head
        start = pos + HEADER_SIZE
        end = start + payload_len
        if len(buf) < end:
            return self._short()
        payload = self._take_payload(start, end, payload_crc, spec) if payload_len else b""
        self._head = None
        self._consume(end)
        return self._unpack(head, payload)

    def _next_received(self) -> Frame | NeedData | PeerClosed:
        """The frame whose payload is received in place (``receive_buffer``)."""
        into, head = self._into, self._head
        assert into is not None and head is not None
        if self._filled < len(into):
            return self._short()
        self._into, self._filled, self._head = None, 0, None
        _check_crc(into, head[6], head[0])
        return self._unpack(head, memoryview(into).toreadonly())

    def _unpack(self, head: _Head, payload: Buffer) -> Frame:
        spec, flags, seq, offset, length, _, _ = head
        try:
            frame = spec.cls._unpack(flags, seq, offset, length, payload)
        except (ValueError, TypeError, struct.error) as err:
            raise ProtocolError(f"{spec.name} frame payload is malformed: {err}") from None
        _check_extents_inside(frame, self.size)
        return frame

    def _short(self) -> NeedData | PeerClosed:
        if not self._eof:
            return NEED_DATA
        if self.buffered:
            raise ProtocolError(f"the peer closed in the middle of a frame ({self.buffered} "
                                "bytes of it buffered)")
        return PEER_CLOSED

    def _parse_header(self, buf: bytearray, pos: int) -> _Head:
        (magic, code, flags, reserved, seq, offset, length, payload_len, payload_crc,
         header_crc) = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not an nbdmirror peer, or the "
                                "stream lost its framing")
        with memoryview(buf) as view, view[pos:pos + HEADER_SIZE - 4] as covered:
            actual = crc32c(covered)
        if actual != header_crc:
            raise ProtocolError(f"header checksum mismatch (0x{header_crc:08x}, computed "
                                f"0x{actual:08x})")
        spec = _BY_CODE[code]
        if spec is None:
            raise ProtocolError(f"unknown frame type 0x{code:02x}")
        if reserved:
            raise ProtocolError(f"{spec.name} frame has reserved bits set (0x{reserved:04x})")
        if seq and spec.cls in _SEQLESS:  # nothing would carry it: not a canonical frame
            raise ProtocolError(f"{spec.name} frame has a nonzero sequence number")
        _check_header(spec, flags, offset, length, payload_len, self.size, self.region_size)
        return spec, flags, seq, offset, length, payload_len, payload_crc

    def _take_payload(self, start: int, end: int, payload_crc: int, spec: _Spec) -> Buffer:
        buf = self._buf
        with memoryview(buf) as view, view[start:end] as chunk:
            _check_crc(chunk, payload_crc, spec)
            if end == len(buf) and end - start >= _HANDOFF_MIN:
                # The payload ends the buffer: hand the buffer over instead of copying.
                self._buf = bytearray()
                self._pos = 0
                return memoryview(buf).toreadonly()[start:end]
            return bytes(chunk)

    def _consume(self, end: int) -> None:
        if end >= len(self._buf):
            # A handed-over buffer was replaced already; an emptied one is cleared cheaply.
            if self._buf:
                del self._buf[:]
            self._pos = 0
        elif end >= _COMPACT_AT:
            del self._buf[:end]
            self._pos = 0
        else:
            self._pos = end


# ------------------------------------------------------------------------------ connection


class State(enum.Enum):
    """Where a connection is in its life."""

    START = "start"  # nothing yet: the primary sends HELLO
    HELLO = "hello"  # HELLO passed: the secondary answers HELLO_REPLY
    AUTH = "auth"  # accepted, with a secret: AUTH, the primary's first
    MARKS = "marks"  # accepted (and authenticated): the secondary sends MARKED_RUNS
    READY = "ready"  # data frames flow both ways
    CLOSED = "closed"  # an ERROR or a refusal passed: drop the connection
    BROKEN = "broken"  # a ProtocolError or a failed authentication: drop the connection


class Connection:
    """One end of a replication connection: frames in and out, with the handshake's rules.

    ``send(frame)`` / ``send_parts(frame)`` check that this end may send the frame
    now and return its bytes; ``receive_data`` / ``next_frame`` decode the peer's
    bytes and check that the peer may send what it sent. Data frames flow only
    in ``State.READY``. With a ``secret``, the connection computes its own AUTH
    (``auth_frame``) and checks the peer's itself.
    """

    def __init__(self, role: Role | str, secret: bytes | None = None,
                 binding: bytes = b"") -> None:
        self.role = Role(role)
        self.peer_role = Role.SECONDARY if self.role is Role.PRIMARY else Role.PRIMARY
        self.secret = secret or None
        self.binding = binding
        self.state = State.START
        self.hello: Hello | None = None
        self.reply: HelloReply | None = None
        #: The secondary's marked runs, (first region, count), as MARKED_RUNS carried them.
        self.marked_runs: list[tuple[int, int]] = []
        self._primary_authed = False
        self._decoder = Decoder()
        self._failure: str | None = None
        # The frames each side may send once READY without a look at the state machine.
        ready = [s for s in _SPECS if s.phase is _Phase.READY]
        self._ready_send = frozenset(s.cls for s in ready if self.role in s.senders)
        self._ready_recv = frozenset(s.cls for s in ready if self.peer_role in s.senders)

    # -- building the handshake's frames

    def make_hello(self, *, uuid: str, size: int, region_size: int, generation: int,
                   mode: str) -> Hello:
        """The primary's HELLO, with a fresh nonce and this end's auth setting."""
        return Hello(PROTOCOL_VERSION, self.role.value, uuid, size, region_size, generation,
                     mode, auth.make_nonce(), self.secret is not None)

    def make_reply(self, *, accepted: bool, reason: str, uuid: str, size: int,
                   region_size: int, generation: int) -> HelloReply:
        """The secondary's HELLO_REPLY, with a fresh nonce and this end's auth setting."""
        return HelloReply(accepted, reason, PROTOCOL_VERSION, self.role.value, uuid, size,
                          region_size, generation, auth.make_nonce(), self.secret is not None)

    def marked_runs_frames(self, runs: Any) -> list[MarkedRuns]:
        """The secondary's MARKED_RUNS frames for ``runs`` ((first region, count) rows,
        ascending, disjoint): joined to at most ``MAX_MARKED_RUNS``, the last with END."""
        rows = [(int(a), int(n)) for a, n in coarsen_runs(runs).tolist()]
        chunks = [tuple(rows[i:i + RUNS_PER_FRAME])
                  for i in range(0, len(rows), RUNS_PER_FRAME)] or [()]
        return [MarkedRuns(chunk, end=i == len(chunks) - 1) for i, chunk in enumerate(chunks)]

    def auth_frame(self) -> Auth:
        """This end's AUTH: its answer over both nonces."""
        if self.secret is None or self.hello is None or self.reply is None:
            raise self._broken("local: AUTH needs a secret and a completed HELLO exchange")
        return Auth(auth.answer(self.secret, self.role.value, self.hello.nonce,
                                self.reply.nonce, self.binding))

    # -- sending

    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, after checking that this end may send it now."""
        head, payload = self.send_parts(frame)
        return head + payload if len(payload) else head

    def send_parts(self, frame: Frame) -> tuple[bytes, Buffer]:
        """Like ``send``, with header and payload apart (the payload is not copied)."""
        cls = type(frame)
        if self.state is not State.READY or cls not in self._ready_send:
            self._advance(frame, self.role)
        try:
            flags, seq, offset, length, payload = frame._pack()
            # What the peer's decoder will check, checked here so a bug shows at its source.
            _check_header(_BY_CLASS[cls], flags, offset, length, len(payload),
                          self._decoder.size, self._decoder.region_size)
            _check_extents_inside(frame, self._decoder.size)
        except (AttributeError, TypeError, ValueError, ProtocolError) as err:
            raise self._broken(f"local: cannot send {frame_name(frame)}: {err}") from None
        return _encode(frame, flags, seq, offset, length, payload)

    # -- receiving

    def receive_data(self, data: Buffer) -> None:
        """Bytes from the peer; ``b""`` when it closed its end."""
        self._refuse_if_broken()
        try:
            self._decoder.receive_data(data)
        except ProtocolError as err:
            raise self._broken(str(err)) from None

    def next_frame(self) -> Frame | NeedData | PeerClosed:
        """The peer's next frame (checked against the handshake), or a sentinel."""
        self._refuse_if_broken()
        try:
            frame = self._decoder.next_frame()
        except ProtocolError as err:
            raise self._broken(str(err)) from None
        if isinstance(frame, Frame) and (
                self.state is not State.READY or type(frame) not in self._ready_recv):
            self._advance(frame, self.peer_role)
        return frame

    def bytes_needed(self) -> int:
        """How many more bytes complete the peer's next frame (see ``Decoder``)."""
        return self._decoder.bytes_needed()

    def receive_buffer(self) -> memoryview | None:
        """Where to receive the rest of a large payload in place (see ``Decoder``)."""
        self._refuse_if_broken()
        return self._decoder.receive_buffer()

    def received(self, n: int) -> None:
        """``n`` bytes were received into ``receive_buffer()``."""
        self._refuse_if_broken()
        self._decoder.received(n)

    # -- the state machine

    def _refuse_if_broken(self) -> None:
        if self._failure is not None:
            raise ProtocolError(f"connection already failed: {self._failure}")

    def _broken(self, message: str, error: type[Exception] = ProtocolError) -> Exception:
        self.state = State.BROKEN
        if self._failure is None:
            self._failure = message
        return error(message)

    def _advance(self, frame: Frame, sender: Role) -> None:
        """Check a frame that is not a plain READY data frame and move the state on."""
        self._refuse_if_broken()
        spec = _BY_CLASS[type(frame)]
        local = sender is self.role
        where = "local: cannot send" if local else "received"
        if sender not in spec.senders:
            raise self._broken(f"{where} {spec.name} from the {sender.value}: only a "
                               f"{' or '.join(sorted(r.value for r in spec.senders))} sends it")
        if self.state is State.CLOSED:
            raise self._broken(f"{where} {spec.name} after the connection was closed")
        if isinstance(frame, Error):
            self.state = State.CLOSED
        elif spec.phase is _Phase.READY:
            raise self._broken(f"{where} {spec.name} before the handshake completed "
                               f"(state {self.state.value})")
        elif isinstance(frame, Hello):
            self._on_hello(frame, local, where)
        elif isinstance(frame, HelloReply):
            self._on_reply(frame, local, where)
        elif isinstance(frame, Auth):
            self._on_auth(frame, sender, local, where)
        elif isinstance(frame, MarkedRuns):
            self._on_marked_runs(frame, where)

    def _on_hello(self, hello: Hello, local: bool, where: str) -> None:
        if self.state is not State.START:
            raise self._broken(f"{where} HELLO twice")
        if local and hello.auth != (self.secret is not None):
            raise self._broken("local: cannot send HELLO whose auth setting differs from the "
                               "secret given to this connection")
        self.hello = hello
        self.state = State.HELLO

    def _on_reply(self, reply: HelloReply, local: bool, where: str) -> None:
        if self.state is not State.HELLO or self.hello is None:
            raise self._broken(f"{where} HELLO_REPLY without a HELLO before it")
        self.reply = reply
        if not reply.accepted:
            self.state = State.CLOSED
            if not local:
                raise PeerRefused(f"the secondary refused: {reply.reason}")
            return
        problem = auth_problem(self.hello.auth, reply.auth)
        if problem is None and reply.auth and reply.nonce == self.hello.nonce:
            problem = "the secondary sent back the primary's own nonce"
        if problem is not None:
            if local:
                raise self._broken(f"local: cannot accept: {problem}")
            raise self._broken(problem, PeerRefused)
        if reply.auth != (self.secret is not None):
            raise self._broken(f"{where} HELLO_REPLY whose auth setting differs from this "
                               "end's secret")
        if reply.auth:
            self.state = State.AUTH
        else:
            self._to_marks()

    def _on_auth(self, frame: Auth, sender: Role, local: bool, where: str) -> None:
        if self.state is not State.AUTH or self.hello is None or self.reply is None:
            raise self._broken(f"{where} AUTH outside the authentication step "
                               f"(state {self.state.value})")
        if (sender is Role.PRIMARY) == self._primary_authed:
            raise self._broken(f"{where} AUTH from the {sender.value} out of turn: the "
                               "primary's comes first, then the secondary's, once each")
        if not local:
            assert self.secret is not None  # AUTH state is only reached with one
            if not auth.check(self.secret, frame.mac, sender.value, self.hello.nonce,
                              self.reply.nonce, self.binding):
                raise self._broken(f"authentication failed: the {sender.value} does not know "
                                   "the shared secret", PeerRefused)
        if sender is Role.PRIMARY:
            self._primary_authed = True
        else:
            self._to_marks()

    def _to_marks(self) -> None:
        """Accepted (and authenticated): the secondary's marks come next. A geometry no
        volume can have is refused here already."""
        assert self.hello is not None
        try:
            Decoder().set_volume(self.hello.size, self.hello.region_size)
        except ProtocolError as err:
            raise self._broken(str(err)) from None
        self.state = State.MARKS

    def _on_marked_runs(self, frame: MarkedRuns, where: str) -> None:
        if self.state is not State.MARKS or self.hello is None:
            raise self._broken(f"{where} MARKED_RUNS outside the marks step (state "
                               f"{self.state.value})")
        if len(self.marked_runs) + len(frame.runs) > MAX_MARKED_RUNS:
            raise self._broken(f"{where} more than {MAX_MARKED_RUNS} MARKED_RUNS runs")
        size, region_size = self.hello.size, self.hello.region_size  # checked: _to_marks
        reach = self.marked_runs[-1][0] + self.marked_runs[-1][1] if self.marked_runs else 0
        try:
            _check_runs(frame.runs, reach, -(-size // region_size))
        except ProtocolError as err:
            raise self._broken(f"{where} {err}") from None
        self.marked_runs.extend(frame.runs)
        if frame.end:
            self._become_ready()

    def _become_ready(self) -> None:
        assert self.hello is not None
        try:
            self._decoder.set_volume(self.hello.size, self.hello.region_size)
        except ProtocolError as err:
            raise self._broken(str(err)) from None
        self.state = State.READY


# ------------------------------------------------------------------- handshake decisions


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """What one side's volume is, as the handshake compares it."""

    uuid: str
    size: int
    region_size: int
    generation: int


_SIZE_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def _exact_size(n: int) -> str:
    """``256 MiB``, ``1536 MiB``, ``268435968 bytes``: never rounded, so differences show."""
    for unit, factor in _SIZE_UNITS:
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def _sizes(what: str, primary: int, secondary: int) -> str:
    return f"{what} differs: primary {_exact_size(primary)}, secondary {_exact_size(secondary)}"


def auth_problem(primary_auth: bool, secondary_auth: bool) -> str | None:
    """Why two ends' shared-secret settings cannot work together, or None."""
    if secondary_auth and not primary_auth:
        return "the secondary requires a shared secret (--secret-file); the primary has none"
    if primary_auth and not secondary_auth:
        return ("the primary has a shared secret; the secondary has none (give it "
                "--secret-file)")
    return None


def _shared_problem(version: int, peer_role: str, want_role: str, primary: Identity,
                    secondary: Identity) -> str | None:
    if version != PROTOCOL_VERSION:
        ours = PROTOCOL_VERSION
        p, s = (version, ours) if want_role == "primary" else (ours, version)
        return f"protocol version differs: primary speaks {p}, secondary {s}"
    if peer_role != want_role:
        return f"the peer is not a {want_role} (it says it is a {peer_role!r})"
    if primary.uuid == secondary.uuid:
        return f"the peer is this same volume ({primary.uuid}): refusing to replicate onto itself"
    if primary.size != secondary.size:
        return _sizes("volume size", primary.size, secondary.size)
    if primary.region_size != secondary.region_size:
        return _sizes("region size", primary.region_size, secondary.region_size)
    return None


def hello_problem(hello: Hello, local: Identity, *, secret: bool,
                  paired_uuid: str | None = None, paired_generation: int = 0) -> str | None:
    """Why a secondary must refuse this HELLO, as one line, or None to accept it.

    ``local`` is the secondary's own volume; ``paired_uuid`` and
    ``paired_generation`` are those of the primary it is paired with (None and
    0 before its first primary); ``secret`` says whether it has a shared secret.
    """
    primary = Identity(hello.uuid, hello.size, hello.region_size, hello.generation)
    problem = _shared_problem(hello.version, hello.role, "primary", primary, local)
    if problem is not None:
        return problem
    if hello.mode not in MODES:
        return f"unknown replication mode {hello.mode!r} (expected {', '.join(MODES)})"
    if paired_uuid is not None and hello.uuid != paired_uuid:
        return (f"the secondary is paired with primary volume {paired_uuid}; this primary is "
                f"volume {hello.uuid}")
    if hello.generation < paired_generation:
        return (f"stale primary: generation {hello.generation}, the secondary has seen "
                f"generation {paired_generation}")
    return auth_problem(hello.auth, secret)


def reply_problem(reply: HelloReply, local: Identity) -> str | None:
    """Why a primary must not use a secondary that accepted it, as one line, or None.

    A refused reply never gets here (``Connection`` raises ``PeerRefused``).
    """
    secondary = Identity(reply.uuid, reply.size, reply.region_size, reply.generation)
    return _shared_problem(reply.version, reply.role, "secondary", local, secondary)

