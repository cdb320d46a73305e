#!/usr/bin/env python3
"""A user-space stand-in for ``tc qdisc ... netem``: an IP link made of two TUN devices and
this process between them, which delays, jitters and drops the packets it relays.

    netem_relay.py --outer bv123h4r --inner bv123h4p --control /tmp/x/relay.sock

It creates both TUN devices in the namespace it runs in, prints ``ready`` and relays raw IP
packets between them (``tests/harness/netns.py`` then moves ``--inner`` into a namespace and
gives both ends addresses, so the pair is a point-to-point link). It is used only where the
kernel has no ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` unset, no module): every packet of the
link passes here, so a dropped one is really lost and TCP retransmits it, as with netem.

Each direction (``out``: outer -> inner, ``in``: inner -> outer) has its own ``delay_ms``,
``jitter_ms`` (uniform in +-jitter, as netem without a distribution table; packets may be
reordered, as with netem) and ``loss`` (a probability). The control socket takes one JSON
line and answers one: ``{"set": {"out": {...}, "in": {...}}}`` changes the shaping,
``{"stats": true}`` answers the counters ``{"out": {"packets", "bytes", "dropped"}, "in": ...}``.
The devices vanish when the process ends (they are not persistent).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import random
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    def __init__(self, source: int, target: int) -> None:
        self.source, self.target = source, target
        self.delay = self.jitter = self.loss = 0.0
        self.packets = self.bytes = self.dropped = 0
        self.rng = random.Random()

    def configure(self, spec: dict[str, float]) -> None:
        self.delay = float(spec.get("delay_ms", 0)) / 1000
        self.jitter = float(spec.get("jitter_ms", 0)) / 1000
        self.loss = float(spec.get("loss", 0))

    def stats(self) -> dict[str, int]:
        return {"packets": self.packets, "bytes": self.bytes, "dropped": self.dropped}

    def send(self, packet: bytes) -> None:
        try:
            os.write(self.target, packet)
        except OSError:  # the device is down or gone: the packet is lost, as on a cable
            self.dropped += 1

    def readable(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                packet = os.read(self.source, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            self.packets += 1
            self.bytes += len(packet)
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            wait = self.delay + (self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
            if wait <= 0:
                self.send(packet)
            else:
                loop.call_later(wait, self.send, packet)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer", required=True, help="TUN device left in this namespace")
    parser.add_argument("--inner", required=True, help="TUN device the harness moves into a namespace")
    parser.add_argument("--control", required=True, help="unix socket for shaping and counters")
    args = parser.parse_args()
    outer, inner = open_tun(args.outer), open_tun(args.inner)
    loop = asyncio.get_running_loop()
    directions = {"out": Direction(outer, inner), "in": Direction(inner, outer)}
    for direction in directions.values():
        loop.add_reader(direction.source, direction.readable, loop)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            for key, spec in (request.get("set") or {}).items():
                directions[key].configure(spec)
            writer.write(json.dumps({k: d.stats() for k, d in directions.items()}).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(control, path=args.control)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
