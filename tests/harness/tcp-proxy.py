#!/usr/bin/env python3
"""A TCP fault proxy for tests: forwards ``--listen`` to ``--target`` and counts the bytes.

    tcp-proxy.py --listen 127.0.0.1:9000 --target 127.0.0.1:9001 --control 127.0.0.1:9002

Tests SIGKILL it to make the server behind it unreachable (the server keeps its state) and
start it again on the same port. ``GET /stats`` on the control port answers
``{"in": <bytes client->server>, "out": <bytes server->client>, "connections": n}``, counted
as bytes pass, so a test reads them while connections stay open (HTTP keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import json

COUNTERS = {"in": 0, "out": 0, "connections": 0}


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
    try:
        while data := await reader.read(1 << 18):
            COUNTERS[counter] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()


async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, host: str, port: int) -> None:
    COUNTERS["connections"] += 1
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pump(client_r, server_w, "in"), pump(server_r, client_w, "out"))
    for writer in (client_w, server_w):
        writer.close()


async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # the request line and headers: every request gets the stats
        body = json.dumps(COUNTERS).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
    finally:
        writer.close()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=address)
    parser.add_argument("--target", required=True, type=address)
    parser.add_argument("--control", required=True, type=address)
    args = parser.parse_args()
    target_host, target_port = args.target

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await forward(reader, writer, target_host, target_port)

    proxy = await asyncio.start_server(on_client, *args.listen, reuse_address=True)
    stats = await asyncio.start_server(control, *args.control, reuse_address=True)
    async with proxy, stats:
        await asyncio.gather(proxy.serve_forever(), stats.serve_forever())


if __name__ == "__main__":
    asyncio.run(main())
