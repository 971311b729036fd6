"""``nbdmirror``: create, serve, attach and inspect replicated volumes.

Every failure is one line on stderr and exit status 1; usage mistakes exit 2.
Set NBDMIRROR_DEBUG=1 to see a traceback for an unexpected error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from volume_core import runtime
from volume_core.errors import NbdMirrorError, ServerError
from volume_core.regions import load_marks
from volume_core.units import format_size, parse_size
from volume_core.volume import DEFAULT_REGION_SIZE, Volume

from . import devices, server
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


def open_volume(path: str) -> Volume:
    return Volume.open(path)


SizeType = click.STRING
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


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
@click.option("--size", required=True, help="Volume size, e.g. 512M, 10G, 2T (a multiple of 512).")
@click.option("--region-size", default="64K", show_default=True,
              help="Tracking granularity: a power of two from 4K to 16M.")
@json_option
def create(vol: str, size: str, region_size: str, as_json: bool) -> None:
    """Create a new volume directory VOL. Refuses to overwrite anything."""
    volume = Volume.create(vol, parse_size(size), parse_size(region_size, "region size")
                           if region_size else DEFAULT_REGION_SIZE)
    info = volume.info
    emit(info.to_json() | {"path": str(volume.path.absolute()), "regions": info.regions},
         as_json, [f"created {vol}: {format_size(info.size)}, {info.regions} regions of "
                   f"{format_size(info.region_size)}, uuid {info.uuid}"])


@cli.command()
@click.argument("vol", type=click.Path())
@json_option
def info(vol: str, as_json: bool) -> None:
    """Describe volume VOL (works whether or not it is served)."""
    volume = open_volume(vol)
    i = volume.info
    marked = int(load_marks(volume.marks_path, i.regions).sum())
    state = runtime.read_state(volume)
    data = i.to_json() | {
        "path": str(volume.path.absolute()),
        "regions": i.regions,
        "marked_regions": marked,
        "allocated_bytes": volume.data_path.stat().st_blocks * 512,
        "served": state is not None,
        "listen": (state or {}).get("listen"),
    }
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
        f"served:      {'yes, on ' + (data['listen'] or '?') if state is not None else 'no'}",
    ]
    emit(data, as_json, human)


def _endpoint_for(volume: Volume, socket: str | None, port: int | None, address: str) -> Endpoint:
    if socket and port:
        raise click.UsageError("give --socket or --port, not both")
    if port is not None:
        return Endpoint(host=address, port=port)
    if socket:
        return Endpoint(socket=Path(socket).absolute())
    path = runtime.default_nbd_socket(volume)
    if len(os.fsencode(str(path))) > 100:  # sun_path limit: use a short path under /run
        short = devices.RUN_DIR / "sockets"
        short.mkdir(parents=True, exist_ok=True)
        path = short / f"{volume.info.uuid}.sock"
    return Endpoint(socket=path)


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--socket", type=click.Path(), help="Serve on this unix socket "
              "(default: VOL/nbd.sock).")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve on this TCP port instead.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on with --port.")
@click.option("--background", is_flag=True,
              help="Return once the export accepts connections; the pid is in VOL/nbdkit.pid.")
@json_option
def serve(vol: str, socket: str | None, port: int | None, address: str, background: bool,
          as_json: bool) -> None:
    """Serve volume VOL as an NBD export (nbdkit + the nbdmirror plugin).

    In the foreground it runs until Ctrl-C or 'nbdmirror stop VOL'.
    """
    volume = open_volume(vol)
    endpoint = _endpoint_for(volume, socket, port, address)
    if not background:
        click.echo(f"serving {vol} on {endpoint} (Ctrl-C to stop)", err=True)
        server.serve_foreground(volume, endpoint)
        return
    state = server.serve_background(volume, endpoint)
    emit({"volume": str(volume.path.absolute()), "listen": str(endpoint),
          "uri": endpoint.uri, "pid": state.get("pid")}, as_json,
         [f"serving {vol} on {endpoint} (pid {state.get('pid')}); "
          f"stop with: nbdmirror stop {vol}"])


@cli.command()
@click.argument("vol", type=click.Path())
@click.option("--force", is_flag=True, help="Stop even while a block device is attached to it.")
def stop(vol: str, force: bool) -> None:
    """Stop the background server of volume VOL."""
    volume = open_volume(vol)
    if not force:
        mine = str(volume.path.absolute())
        for rec in devices.attachments():
            if rec.get("volume") == mine:
                raise ServerError(f"{vol} is attached as {rec['device']}; detach it first "
                                  "(or use --force)")
    pid = server.stop(volume)
    click.echo(f"stopped the server of {vol} (pid {pid})")


@cli.command()
@click.argument("vol", type=click.Path())
@json_option
def status(vol: str, as_json: bool) -> None:
    """Live state of the running server of VOL: requests, bytes, marked regions."""
    volume = open_volume(vol)
    st = server.status(volume)
    s = st["stats"]
    human = [
        f"volume:      {st['volume']} ({st['role']}, generation {st['generation']})",
        f"served on:   {st.get('listen') or '?'} by pid {st['pid']}, up {st['uptime']:.0f}s",
        f"size:        {format_size(st['size'])}, {st['regions']} regions of "
        f"{format_size(st['region_size'])}",
        f"marked:      {st['marked_regions']} regions",
        f"reads:       {s['reads']} requests, {format_size(s['bytes_read'])}",
        f"writes:      {s['writes']} requests, {format_size(s['bytes_written'])}",
        f"trims/zero:  {s['trims']} / {s['zeroes']}; flushes {s['flushes']}",
    ]
    emit(st, as_json, human)


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
        volume = open_volume(vol)
        endpoint = server.find_endpoint(volume)
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
def detach(device: str) -> None:
    """Detach a block device made by 'nbdmirror attach' (unmount it first)."""
    record = devices.detach(device)
    click.echo(f"detached {record['device']}", err=True)


def main() -> None:
    try:
        cli(prog_name="nbdmirror")
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
