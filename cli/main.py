"""``nbdmirror``: create, serve, attach and inspect replicated volumes.

Every failure is one line on stderr and exit status 1; usage mistakes exit 2.
Set NBDMIRROR_DEBUG=1 to see a traceback for an unexpected error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import click

from volume_core import consistent as consistent_images
from volume_core import operations, snapshots
from volume_core.cycle_freeze import CycleFreeze
from volume_core.errors import NbdMirrorError, ServerError, UsageError
from volume_core.replication import receiver, session
from volume_core.server_files import ServerPlace
from volume_core.units import format_size
from volume_core.volume import Volume, validate_geometry

from . import cycles, devices, params, receiving, server
from .server import Endpoint


class Group(click.Group):
    """Turns nbdmirror errors into one line and exit 1, and never shows a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NbdMirrorError as err:
            raise click.ClickException(str(err)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as err:  # noqa: BLE001 - the last line of defence
            if os.environ.get("NBDMIRROR_DEBUG"):
                traceback.print_exc()
            raise click.ClickException(f"internal error: {type(err).__name__}: {err}") from None


def emit(data: dict, as_json: bool, human: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo("\n".join(human))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
threads_option = click.option(
    "--threads", type=click.IntRange(1, server.MAX_THREADS), default=None,
    help=f"Requests nbdkit handles at once per connection (default {server.DEFAULT_THREADS}, "
         f"{server.REPLICATED_THREADS} when replicating: a replicated write waits for its "
         "peer). Python threads share one GIL, so fewer threads are often faster; see the "
         "README's performance section.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbdmirror")
def cli() -> None:
    """Replicated block volumes served over NBD.

    A volume is a directory holding a raw sparse image (data.img), its
    description and its region maps. Serve it with nbdkit, attach it as a
    block device, and put any filesystem on it.

    \b
    Typical use:
      nbdmirror create /srv/vol1 --size 10G
      nbdmirror serve /srv/vol1 --background
      nbdmirror attach /srv/vol1          # prints /dev/nbdN or /dev/loopN
      mkfs.ext4 /dev/loop0 && mount /dev/loop0 /mnt
      nbdmirror status /srv/vol1
    """


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--size", required=True, type=params.VOLUME_SIZE,
              help="Volume size, e.g. 512M, 10G, 2T (a multiple of 512).")
@click.option("--region-size", default="64K", show_default=True, type=params.REGION_SIZE,
              help="Tracking granularity: a power of two from 4K to 16M.")
@json_option
def create(vol: str, size: int, region_size: int, as_json: bool) -> None:
    """Create a new volume directory VOL. Refuses to overwrite anything."""
    try:
        validate_geometry(size, region_size)
    except UsageError as err:
        raise click.UsageError(str(err)) from None
    volume = Volume.create(vol, size, region_size)
    info = volume.info
    emit(info.to_json() | {"path": str(volume.path.absolute()), "regions": info.regions},
         as_json, [f"created {vol}: {format_size(info.size)}, {info.regions} regions of "
                   f"{format_size(info.region_size)}, uuid {info.uuid}"])


@cli.command()
@click.argument("vol", type=click.Path())
@json_option
def info(vol: str, as_json: bool) -> None:
    """Describe volume VOL (works whether or not it is served)."""
    volume = Volume.open(vol)
    i = volume.info
    data = operations.describe(volume)
    marked = data["marked_regions"]
    human = [
        f"volume:      {data['path']}",
        f"uuid:        {i.uuid}",
        f"size:        {format_size(i.size)} ({i.size} bytes)",
        f"regions:     {i.regions} of {format_size(i.region_size)}",
        f"role:        {i.role}",
        f"generation:  {i.generation}",
        f"created:     {i.created}",
        f"marked:      {marked} regions",
        f"allocated:   {format_size(data['allocated_bytes'])}",
        f"served:      {'yes, on ' + (data['listen'] or '?') if data['served'] else 'no'}",
    ]
    emit(data, as_json, human)


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--socket", type=click.Path(), help="Serve on this unix socket "
              "(default: VOL/nbd.sock).")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve on this TCP port instead.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on with --port.")
@click.option("--background", is_flag=True,
              help="Return once the export accepts connections; the pid is in VOL/nbdkit.pid.")
@click.option("--replicate-to", metavar="HOST:PORT",
              help="Replicate every write to the secondary listening there "
                   "('nbdmirror receive').")
@click.option("--mode", type=click.Choice(["sync", "semi-async", "async"]),
              help="sync: a write completes once the secondary has its data; semi-async: "
                   "once the secondary has its metadata (durably); async: once it is written "
                   "here, and the secondary is brought up to date in cycles, each ending "
                   "with a consistent image there.")
@click.option("--interval", metavar="SECONDS",
              help="With --mode async: seconds between cycles (default 30; 0: only on "
                   "'nbdmirror sync').")
@click.option("--max-rate", metavar="RATE",
              help="With --mode async: cycles (and the initial sync) convey at most RATE "
                   "bytes a second (e.g. 100M: 100 MiB/s; at least 1M). Leaves CPU, disks "
                   "and link to the host's writes; the recovery point lags further while "
                   "they are busy. Default: no cap.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="Shared secret for the replication link (both sides prove they know it).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="Encrypt the replication link; the secondary's certificate must be signed "
                   "by this CA.")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="This primary's certificate (when the secondary asks for one).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key.")
@click.option("--consistent", is_flag=True,
              help="On an async secondary: serve its consistent image read-only, also while "
                   "the next cycle arrives. Each new connection sees the newest committed "
                   "cycle and keeps that point in time until it disconnects; one server per "
                   "volume, beside 'nbdmirror receive' (default socket: "
                   "VOL/consistent/nbd.sock; stop with 'nbdmirror stop VOL --consistent').")
@threads_option
@json_option
def serve(vol: str, socket: str | None, port: int | None, address: str, background: bool,
          replicate_to: str | None, mode: str | None, interval: str | None,
          max_rate: str | None, secret_file: str | None, tls_ca: str | None,
          tls_cert: str | None, tls_key: str | None, consistent: bool, threads: int | None,
          as_json: bool) -> None:
    """Serve volume VOL as an NBD export (nbdkit + the nbdmirror plugin).

    In the foreground it runs until Ctrl-C; with --background until
    'nbdmirror stop VOL'.
    """
    extra = _replication_keys(replicate_to, mode, interval, max_rate, secret_file, tls_ca,
                              tls_cert, tls_key)
    if consistent:
        if extra:
            raise click.UsageError("--consistent serves a secondary's image: it takes no "
                                   "replication options")
        volume = Volume.open(vol)
        consistent_images.newest_image(volume)  # none yet, or no secondary: refused here
        _serve(ServerPlace(volume, consistent=True), socket, port, address, background,
               threads, as_json)
        return
    if threads is None:  # an async write waits for nothing remote: as unreplicated
        waits = extra and mode != session.ASYNC
        threads = server.REPLICATED_THREADS if waits else server.DEFAULT_THREADS
    volume = Volume.open(vol)
    if mode == session.ASYNC and extra:
        CycleFreeze.check(volume)  # a damaged open cycle: refused here, in one line
    _serve(ServerPlace(volume), socket, port, address, background, threads, as_json, extra)


def _replication_keys(replicate_to: str | None, mode: str | None, interval: str | None,
                      max_rate: str | None, secret_file: str | None, tls_ca: str | None,
                      tls_cert: str | None, tls_key: str | None) -> tuple[str, ...]:
    """The plugin's config keys for replication; usage errors for what does not fit."""
    given = {"--mode": mode, "--interval": interval, "--max-rate": max_rate,
             "--secret-file": secret_file, "--tls-ca": tls_ca, "--tls-cert": tls_cert,
             "--tls-key": tls_key}
    if replicate_to is None:
        if any(given.values()):
            raise click.UsageError(f"{next(k for k, v in given.items() if v)} needs "
                                   "--replicate-to HOST:PORT")
        return ()
    if mode is None:
        raise click.UsageError("--replicate-to needs --mode sync, semi-async or async")
    for option, value in (("--interval", interval), ("--max-rate", max_rate)):
        if value is not None and mode != session.ASYNC:
            raise click.UsageError(f"{option} is for --mode async only")
    try:
        session.parse_peer(replicate_to)
        if interval is not None:
            session.parse_interval(interval)
        if max_rate is not None:
            session.parse_rate(max_rate)
    except UsageError as err:
        raise click.UsageError(str(err)) from None
    if (tls_cert is None) != (tls_key is None) or (tls_cert and not tls_ca):
        raise click.UsageError("give --tls-cert and --tls-key together, with --tls-ca")
    keys = [f"replicate-to={replicate_to}", f"mode={mode}"]
    if interval is not None:
        keys.append(f"interval={interval}")
    if max_rate is not None:
        keys.append(f"max-rate={max_rate}")
    for key, value in (("secret-file", secret_file), ("tls-ca", tls_ca),
                       ("tls-cert", tls_cert), ("tls-key", tls_key)):
        if value is not None:
            keys.append(f"{key}={Path(value).absolute()}")
    return tuple(keys)


def _serve(place: ServerPlace, socket: str | None, port: int | None, address: str,
           background: bool, threads: int | None, as_json: bool,
           extra: tuple[str, ...] = ()) -> None:
    threads = server.DEFAULT_THREADS if threads is None else threads
    if socket and port:
        raise click.UsageError("give --socket or --port, not both")
    endpoint = server.choose_endpoint(place, socket, port, address)
    if not background:
        click.echo(f"serving {place.what} on {endpoint} (Ctrl-C to stop)", err=True)
        server.serve_foreground(place, endpoint, extra=extra, threads=threads)
        return
    state = server.serve_background(place, endpoint, extra=extra, threads=threads)
    if place.snapshot is not None:
        stop_cmd = f"nbdmirror snapshot stop {place.volume.path} {place.snapshot}"
    else:
        stop_cmd = f"nbdmirror stop {place.volume.path}"
        if place.consistent:
            stop_cmd += " --consistent"
    emit({"volume": str(place.volume.path.absolute()), "snapshot": place.snapshot,
          "consistent": place.consistent, "listen": str(endpoint), "uri": endpoint.uri,
          "pid": state.get("pid"), "threads": threads}, as_json,
         [f"serving {place.what} on {endpoint} (pid {state.get('pid')}); stop with: {stop_cmd}"])


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--force", is_flag=True, help="Stop even while a block device is attached or "
              "NBD clients are connected: they are cut off, the volume still closes cleanly.")
@click.option("--consistent", is_flag=True, help="Stop the export of a secondary's "
              "consistent image ('serve --consistent'), not its receiver.")
@json_option
def stop(vol: str, force: bool, consistent: bool, as_json: bool) -> None:
    """Stop the server of volume VOL (background or foreground).

    Refused while a block device is attached to it or NBD clients are
    connected, naming them. Exits 1 if the server had to be killed.
    """
    volume = Volume.open(vol, check_files=False)  # a server can be stopped whatever its files
    place = ServerPlace(volume, consistent=consistent)
    if not force:
        devices.ensure_not_attached(place, " (or use --force)")
    pid = server.stop(place, force=force)
    what = "the export of the consistent image" if consistent else "the server"
    emit({"volume": str(volume.path.absolute()), "consistent": consistent, "pid": pid},
         as_json, [f"stopped {what} of {vol} (pid {pid})"])


@cli.command()
@click.argument("vol", type=click.Path())
@json_option
def status(vol: str, as_json: bool) -> None:
    """Live state of the running server of VOL: requests, bytes, marked regions."""
    volume = Volume.open(vol, check_files=False)
    st = operations.call(volume, "status")
    export = ServerPlace(volume, consistent=True).read_state()
    st["consistent_export"] = None if export is None else {
        "listen": export.get("listen"), "pid": export.get("pid")}
    s = st["stats"]
    human = [
        f"volume:      {st['volume']} ({st['role']}, generation {st['generation']})",
        f"served on:   {st.get('listen') or '?'} by pid {st['pid']}, up {st['uptime']:.0f}s",
        f"size:        {format_size(st['size'])}, {st['regions']} regions of "
        f"{format_size(st['region_size'])}",
        f"marked:      {st['marked_regions']} regions",
        f"snapshots:   {st['snapshots']} ({st['cow_regions_copied']} regions copied on write)",
        f"reads:       {s['reads']} requests, {format_size(s['bytes_read'])}",
        f"writes:      {s['writes']} requests, {format_size(s['bytes_written'])}",
        f"trims/zero:  {s['trims']} / {s['zeroes']}; flushes {s['flushes']}",
        f"log:         {st.get('log') or '?'}",
    ] + _replication_lines(st.get("replication"))
    if export is not None:
        human.append(f"consistent:  image served on {export.get('listen') or '?'} by pid "
                     f"{export.get('pid')} (each connection: the newest cycle at its start)")
    emit(st, as_json, human)


@cli.command("sync")
@click.argument("vol", type=click.Path())
@click.option("--wait", is_flag=True,
              help="Return once the cycle is committed on the secondary (progress on "
                   "stderr: a bar on a terminal, a line every few seconds otherwise).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="With --wait: give up (exit 1) after this long.")
@json_option
def sync_cmd(vol: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Start an async mirroring cycle of VOL now.

    The cycle carries everything written before this command; with --wait,
    the secondary then holds it as a consistent image. VOL must be served
    with --replicate-to HOST:PORT --mode async.
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait")
    if timeout is not None and not math.isfinite(timeout):
        raise click.UsageError(f"--timeout {timeout}: expected a number of seconds")
    volume = Volume.open(vol, check_files=False)
    number = cycles.request(volume)
    data = {"volume": str(volume.path.absolute()), "cycle": number, "committed": False}
    human = [f"cycle {number} requested"]
    if wait:
        rep = cycles.wait(volume, number, timeout)
        data |= {"committed": True, "committed_cycle": rep["committed_cycle"],
                 "bytes_conveyed": rep["bytes_conveyed"]}
        human = [f"cycle {number} committed on the secondary "
                 f"(committed cycle now {rep['committed_cycle']})"]
    emit(data, as_json, human)


def _replication_lines(rep: dict | None) -> list[str]:
    """What status says of a primary's link to its secondary."""
    if not rep:
        return []
    if rep.get("role") == "secondary":
        return _receiving_lines(rep)
    if rep.get("mode") == "async":
        return _async_lines(rep)
    age = rep.get("last_ack_age")
    lines = [
        f"replication: {rep['mode']} to {rep['peer']}: {rep['state']}",
        f"  out of sync: {rep['out_of_sync_regions']} regions; in flight: "
        f"{rep['in_flight_writes']} writes; last ack "
        + ("never" if age is None else f"{age:.1f}s ago"),
    ]
    resync = rep.get("resync") or {}
    if resync.get("running"):
        lines.append(f"  resync: {resync['regions_sent']} of {resync['regions']} regions "
                     f"({format_size(resync['bytes_sent'])} sent)")
    if rep.get("last_error"):
        lines.append(f"  last error: {rep['last_error']}")
    return lines


def _async_lines(rep: dict) -> list[str]:
    """What status says of a primary's async mirroring."""
    lag = rep.get("lag_s")
    cyc = rep["cycle"]
    every = f"every {rep['interval']:g}s" if rep["interval"] else "on request"
    if rep.get("max_rate_bps"):
        every += f", at most {format_size(rep['max_rate_bps'])}/s"
    lines = [
        f"replication: async to {rep['peer']}: {rep['state']} (cycles {every})",
        f"  committed: cycle {rep['committed_cycle']}" + _as_of(lag)
        + f"; marked for the next: {rep['marked_regions']} regions",
    ]
    if cyc.get("number") is not None and cyc["state"] != "idle":
        rate = cyc.get("rate_bps")
        lines.append(f"  cycle {cyc['number']} {cyc['state']}: {cyc['conveyed_regions']} of "
                     f"{cyc['regions']} regions ({format_size(cyc['conveyed_bytes'])} of "
                     f"{format_size(cyc['bytes'])}"
                     + ("" if rate is None else f", {format_size(rate)}/s") + ")")
    if rep.get("last_error"):
        lines.append(f"  last error: {rep['last_error']}")
    return lines


def _as_of(lag: float | None) -> str:
    """How old the point in time of a committed cycle is (the recovery point lag)."""
    return "" if lag is None else f", the volume as of {lag:.1f}s ago"


def _receiving_lines(rep: dict) -> list[str]:
    """What status says of a secondary's link from its primary."""
    peer = f" from {rep['peer']}" if rep.get("peer") else ""
    mode = f" ({rep['mode']})" if rep.get("mode") else ""
    lines = [
        f"replication: receiving on {rep['listen']}: {rep['state']}{peer}{mode}",
        f"  primary: {rep.get('primary_uuid') or 'none yet'}; received "
        f"{format_size(rep['bytes_received'])}, {rep['writes_applied']} writes applied",
        f"  pending: {rep['pending_regions']} regions; recovering: "
        f"{rep['recovering_regions']}; marked: {rep['marked_regions']}",
    ]
    if rep.get("mode") == "async":
        arriving = rep.get("cycle_in_progress")
        rate = rep.get("cycle_rate_bps")
        lines.append(f"  committed: cycle {rep.get('committed_cycle', 0)}"
                     + _as_of(rep.get("lag_s"))
                     + (f"; cycle {arriving} arriving" if arriving else "")
                     + ("" if not arriving or rate is None else f" at {format_size(rate)}/s"))
    if rep.get("last_refusal"):
        lines.append(f"  last refused: {rep['last_refusal']}")
    return lines


@cli.command()
@click.argument("vol", required=False, type=click.Path())
@click.option("--socket", type=click.Path(), help="Attach the export on this unix socket.")
@click.option("--port", type=click.IntRange(1, 65535), help="Attach the export on this TCP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Host with --port.")
@json_option
def attach(vol: str | None, socket: str | None, port: int | None, host: str,
           as_json: bool) -> None:
    """Attach an export as a block device and print its path.

    Give a served volume VOL, or --socket/--port of any NBD export. Uses
    nbd-client (/dev/nbdN) where the kernel has nbd, else nbdfuse + losetup
    (/dev/loopN).
    """
    if sum(x is not None for x in (vol, socket, port)) != 1:
        raise click.UsageError("give exactly one of VOL, --socket or --port")
    volume_path = None
    if vol is not None:
        volume = Volume.open(vol)
        endpoint = server.find_endpoint(ServerPlace(volume))
        volume_path = str(volume.path.absolute())
    elif socket is not None:
        if not Path(socket).exists():
            raise ServerError(f"no export is listening on {socket}")
        endpoint = Endpoint(socket=Path(socket).absolute())
    else:
        endpoint = Endpoint(host=host, port=port)
    record = devices.attach(endpoint, volume_path)
    emit(record, as_json, [record["device"]])


@cli.command()
@click.argument("device")
@json_option
def detach(device: str, as_json: bool) -> None:
    """Detach a block device made by 'nbdmirror attach' (unmount it first)."""
    record = devices.detach(device)
    if as_json:
        emit(record, True, [])
    else:
        click.echo(f"detached {record['device']}", err=True)


@cli.group()
def snapshot() -> None:
    """Point-in-time, copy-on-write snapshots of a volume.

    Creating one copies no data: the first write to a region afterwards
    copies the old region into the snapshot. Works on served and stopped
    volumes alike.
    """


@snapshot.command("create")
@click.argument("vol", type=click.Path())
@click.argument("name", required=False)
@json_option
def snapshot_create(vol: str, name: str | None, as_json: bool) -> None:
    """Take snapshot NAME of VOL (default name: snap-DATE-TIME).

    On a served volume it is atomic with respect to writes: every write
    acknowledged before it is in the snapshot, none acknowledged after it.
    """
    volume = Volume.open(vol)
    if name is not None:
        snapshots.validate_name(name)
    made = operations.run(volume, "snapshot-create", name=name)
    emit(made, as_json, [f"created snapshot {made['name']} of {vol}"])


@snapshot.command("list")
@click.argument("vol", type=click.Path())
@json_option
def snapshot_list(vol: str, as_json: bool) -> None:
    """List the snapshots of VOL, oldest first."""
    volume = Volume.open(vol)
    found = operations.list_snapshots(volume)
    human = [f"{'NAME':<28} {'CREATED':<30} {'PRESERVED':>12}  SERVED"]
    human += [f"{s['name']:<28} {s['created']:<30} {format_size(s['bytes_preserved']):>12}  "
              f"{'yes' if s['served'] else 'no'}" for s in found]
    if not found:
        human = [f"{vol} has no snapshots"]
    emit({"volume": str(volume.path.absolute()), "snapshots": found}, as_json, human)


@snapshot.command("delete")
@click.argument("vol", type=click.Path())
@click.argument("name")
@json_option
def snapshot_delete(vol: str, name: str, as_json: bool) -> None:
    """Delete snapshot NAME of VOL and free its space.

    Copies that an older snapshot still needs move to it first, so every
    other snapshot stays exact. Refused while NAME is being served or a block
    device is attached to its export.
    """
    volume = Volume.open(vol)
    snapshots.validate_name(name)
    devices.ensure_not_attached(ServerPlace(volume, name), "")
    operations.run(volume, "snapshot-delete", name=name)
    emit({"volume": str(volume.path.absolute()), "deleted": name}, as_json,
         [f"deleted snapshot {name} of {vol}"])


def _snapshot_place(vol: str, name: str, check_files: bool = True) -> ServerPlace:
    volume = Volume.open(vol, check_files=check_files)
    snapshots.validate_name(name)
    place = ServerPlace(volume, name)
    if not (place.dir / snapshots.INFO).is_file():
        raise snapshots.SnapshotError(f"no snapshot named {name!r} in {vol}")
    return place


@snapshot.command("serve")
@click.argument("vol", type=click.Path())
@click.argument("name")
@click.option("--socket", type=click.Path(), help="Serve on this unix socket "
              "(default: VOL/snapshots/NAME/nbd.sock).")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve on this TCP port instead.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on with --port.")
@click.option("--background", is_flag=True, help="Return once the export accepts connections.")
@threads_option
@json_option
def snapshot_serve(vol: str, name: str, socket: str | None, port: int | None, address: str,
                   background: bool, threads: int, as_json: bool) -> None:
    """Serve snapshot NAME of VOL as a read-only NBD export.

    Attach it with 'nbdmirror attach --socket PATH' and mount it read-only
    (for ext4: mount -o ro,noload). The live volume may keep serving writes.
    """
    _serve(_snapshot_place(vol, name), socket, port, address, background, threads, as_json)


@snapshot.command("stop")
@click.argument("vol", type=click.Path())
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop even while a block device is attached or "
              "NBD clients are connected: they are cut off.")
@json_option
def snapshot_stop(vol: str, name: str, force: bool, as_json: bool) -> None:
    """Stop the export of snapshot NAME of VOL.

    Refused while a block device is attached to it or NBD clients are
    connected, naming them.
    """
    place = _snapshot_place(vol, name, check_files=False)
    if not force:
        devices.ensure_not_attached(place, " (or use --force)")
    pid = server.stop(place, force=force)
    emit({"volume": str(place.volume.path.absolute()), "snapshot": name, "pid": pid}, as_json,
         [f"stopped the export of snapshot {name} of {vol} (pid {pid})"])


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Address to take the primary's connection on, e.g. 0.0.0.0:7000.")
@click.option("--background", is_flag=True,
              help="Return once the listener accepts connections; the pid is in "
                   "VOL/nbdkit.pid.")
@click.option("--secret-file", type=click.Path(),
              help="Shared secret the primary must prove it knows (the file's bytes).")
@click.option("--tls-cert", type=click.Path(), help="This secondary's TLS certificate.")
@click.option("--tls-key", type=click.Path(), help="Its private key.")
@click.option("--tls-ca", type=click.Path(),
              help="CA that signed the primaries' certificates (required with TLS).")
@json_option
def receive(vol: str, listen: str, background: bool, secret_file: str | None,
            tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
            as_json: bool) -> None:
    """Receive replication into VOL: make it the secondary of a primary.

    VOL must exist with the primary's size and region size. The first
    primary to connect pairs with it (VOL's role becomes secondary); others
    are refused. In the foreground it runs until Ctrl-C; with --background
    until 'nbdmirror stop VOL'. 'nbdmirror status VOL' shows the link.
    """
    try:
        host, port = session.parse_peer(listen)
        if any((tls_cert, tls_key, tls_ca)) and not all((tls_cert, tls_key, tls_ca)):
            raise UsageError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    except UsageError as err:
        raise click.UsageError(str(err)) from None
    files = {"--secret-file": secret_file, "--tls-cert": tls_cert, "--tls-key": tls_key,
             "--tls-ca": tls_ca}
    # Read them here too: a bad file is refused in one line before anything starts.
    receiver.Settings.load(listen, secret_file, tls_cert, tls_key, tls_ca)
    place = ServerPlace(Volume.open(vol))
    endpoint = Endpoint(host=host, port=port)
    cmd = receiving.command(place, listen, files)
    if not background:
        click.echo(f"receiving into {place.what} on {endpoint} (Ctrl-C to stop)", err=True)
        receiving.receive_foreground(place, endpoint, cmd)
        return
    state = receiving.receive_background(place, endpoint, cmd)
    emit({"volume": str(place.volume.path.absolute()), "listen": state.get("listen"),
          "pid": state.get("pid"), "log": state.get("log")}, as_json,
         [f"receiving into {place.what} on {state.get('listen')} (pid {state.get('pid')}); "
          f"stop with: nbdmirror stop {place.volume.path}"])


def main() -> None:
    try:
        cli(prog_name="nbdmirror")
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
