"""NBDClient against a real qemu-nbd, plus a scripted fake server for protocol corner cases."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.repository import qemu
from shared.repository.nbd import DIRTY, STATE_HOLE, STATE_ZERO, NBDClient, NBDError

MiB = 1024 * 1024
KiB = 1024


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, incompressible-enough test data."""
    block = bytes((seed * 131 + i * 7 + i // 256) & 0xFF for i in range(4096))
    return (block * (length // len(block) + 1))[:length]


def to_raw(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(out)],
        check=True,
        capture_output=True,
    )
    data = out.read_bytes()
    out.unlink()
    return data


def merged(extents: list[tuple[int, int, int]], want: Callable[[int], bool]) -> list[tuple[int, int]]:
    """(start, end) ranges of consecutive extents whose flags satisfy ``want``."""
    ranges: list[tuple[int, int]] = []
    for off, length, flags in extents:
        if not want(flags):
            continue
        if ranges and ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], off + length)
        else:
            ranges.append((off, off + length))
    return ranges


def check_contiguous(extents: list[tuple[int, int, int]], start: int, end: int) -> None:
    pos = start
    for off, length, _ in extents:
        assert off == pos
        assert length > 0
        pos += length
    assert pos == end


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu.create_qcow2(str(path), 48 * MiB)
    return path


# -- real qemu-nbd ---------------------------------------------------------------------------------


def test_write_read_roundtrip_and_cross_check(image: Path, tmp_path: Path) -> None:
    writes = {0: pattern(1, 100 * KiB), 3 * MiB + 17: pattern(2, 1 * MiB + 5), 20 * MiB: b"\x41" * MiB}
    with qemu.QemuNbdServer(str(image), read_only=False) as srv, srv.connect() as client:
        assert client.size == 48 * MiB
        assert not client.read_only
        for off, data in writes.items():
            client.write(off, data)
        client.write(10 * MiB, memoryview(bytearray(b"xyz" * 1000)))
        for off, data in writes.items():
            assert client.read(off, len(data)) == data
        client.flush()

    expected = bytearray(48 * MiB)
    for off, data in writes.items():
        expected[off : off + len(data)] = data
    expected[10 * MiB : 10 * MiB + 3000] = b"xyz" * 1000
    assert to_raw(image, tmp_path) == bytes(expected)
    io = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-U", "-c", f"read -P 0x41 {20 * MiB} {MiB}", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert io.returncode == 0 and "verification failed" not in io.stdout, io.stdout

    with qemu.QemuNbdServer(str(image)) as srv, srv.connect() as client:
        assert client.read_only
        assert client.read(0, client.size) == bytes(expected)
        buf = bytearray(5000)
        client.read_into(3 * MiB, memoryview(buf))
        assert buf == expected[3 * MiB : 3 * MiB + 5000]


def test_block_status_allocation_shows_holes(image: Path) -> None:
    with qemu.QemuNbdServer(str(image), read_only=False) as srv:
        with srv.connect() as client:
            client.write(1 * MiB, pattern(3, MiB))
            client.write(8 * MiB, pattern(4, 2 * MiB))
            client.flush()
        with srv.connect(["base:allocation"]) as client:
            assert "base:allocation" in client.meta_contexts
            extents = client.block_status("base:allocation")
            check_contiguous(extents, 0, client.size)
            data = merged(extents, lambda f: not f & STATE_HOLE)
            assert data == [(1 * MiB, 2 * MiB), (8 * MiB, 10 * MiB)]
            holes = merged(extents, lambda f: f == STATE_HOLE | STATE_ZERO)
            assert holes == [(0, 1 * MiB), (2 * MiB, 8 * MiB), (10 * MiB, client.size)]

            # a sub-range, clipped exactly to what was asked
            part = client.block_status("base:allocation", 1 * MiB + 4096, 8 * MiB)
            check_contiguous(part, 1 * MiB + 4096, 9 * MiB + 4096)
            assert merged(part, lambda f: not f & STATE_HOLE) == [
                (1 * MiB + 4096, 2 * MiB),
                (8 * MiB, 9 * MiB + 4096),
            ]

            with pytest.raises(NBDError, match="not negotiated"):
                client.block_status("qemu:dirty-bitmap:nope")


def test_write_zeroes(image: Path) -> None:
    with qemu.QemuNbdServer(str(image), read_only=False) as srv, srv.connect(["base:allocation"]) as client:
        assert client.can_write_zeroes
        client.write(0, pattern(5, 4 * MiB))
        client.write_zeroes(1 * MiB, 2 * MiB)
        expected = bytearray(pattern(5, 4 * MiB))
        expected[1 * MiB : 3 * MiB] = bytes(2 * MiB)
        assert client.read(0, 4 * MiB) == bytes(expected)
        extents = client.block_status("base:allocation", 0, 4 * MiB)
        assert merged(extents, lambda f: bool(f & STATE_ZERO)) == [(1 * MiB, 3 * MiB)]

        # the fallback for servers without WRITE_ZEROES writes zero buffers instead
        client.transmission_flags &= ~(1 << 6)
        assert not client.can_write_zeroes
        client.write(6 * MiB, pattern(6, 6 * MiB))
        client.write_zeroes(6 * MiB + 100, 5 * MiB)
        got = client.read(6 * MiB, 6 * MiB)
        assert got[:100] == pattern(6, 100)
        assert got[100 : 100 + 5 * MiB] == bytes(5 * MiB)
        assert got[100 + 5 * MiB :] == pattern(6, 6 * MiB)[100 + 5 * MiB :]


def test_reads_and_writes_larger_than_max_block(image: Path, tmp_path: Path) -> None:
    big = os.urandom(40 * MiB)
    with qemu.QemuNbdServer(str(image), read_only=False) as srv, srv.connect() as client:
        assert client.max_block_size <= 32 * MiB
        client.write(4 * MiB + 3, big)  # split into several WRITE requests
        client.flush()
    with qemu.QemuNbdServer(str(image)) as srv, srv.connect() as client:
        got = client.read(2 * MiB, 44 * MiB)  # crosses 32 MiB, mixes holes and data
        assert got[: 2 * MiB + 3] == bytes(2 * MiB + 3)
        assert got[2 * MiB + 3 : 2 * MiB + 3 + len(big)] == big
        assert got[2 * MiB + 3 + len(big) :] == bytes(44 * MiB - 2 * MiB - 3 - len(big))
        buf = memoryview(bytearray(client.size))
        client.read_into(0, buf)
        assert buf == to_raw(image, tmp_path)


def test_dirty_bitmap_reports_written_ranges(image: Path) -> None:
    granularity = 64 * KiB
    with qemu.QemuNbdServer(str(image), read_only=False) as srv, srv.connect() as client:
        client.write(0, pattern(7, 8 * MiB))  # before the bitmap exists: must not show as dirty
        client.flush()
    qemu.bitmap_add(str(image), "inc", granularity=granularity)

    writes = [(100 * KiB, 10 * KiB), (5 * MiB, 200 * KiB), (20 * MiB - 1, 2), (47 * MiB, MiB)]
    with qemu.QemuNbdServer(str(image), read_only=False) as srv, srv.connect() as client:
        for off, length in writes:
            client.write(off, pattern(off & 0xFF, length))
        client.flush()
    bitmaps = qemu.list_bitmaps(str(image))
    assert [b["name"] for b in bitmaps] == ["inc"]
    assert "in-use" not in bitmaps[0]["flags"]

    expected: list[tuple[int, int]] = []
    for off, length in writes:
        start = off // granularity * granularity
        end = -(-(off + length) // granularity) * granularity
        if expected and expected[-1][1] >= start:
            expected[-1] = (expected[-1][0], max(expected[-1][1], end))
        else:
            expected.append((start, end))
    assert expected[1] == (5 * MiB, 5 * MiB + 256 * KiB)
    assert expected[2] == (20 * MiB - 64 * KiB, 20 * MiB + 64 * KiB)

    context = "qemu:dirty-bitmap:inc"
    with (
        qemu.QemuNbdServer(str(image), bitmap="inc") as srv,
        srv.connect(["base:allocation", context]) as client,
    ):
        assert set(client.meta_contexts) == {"base:allocation", context}
        extents = client.block_status(context)
        check_contiguous(extents, 0, client.size)
        assert merged(extents, lambda f: bool(f & DIRTY)) == expected
        # base:allocation is still answered separately on the same connection
        alloc = client.block_status("base:allocation")
        check_contiguous(alloc, 0, client.size)
        # a window in the middle of a dirty range
        window = client.block_status(context, 5 * MiB + 4096, 8192)
        assert window == [(5 * MiB + 4096, 8192, DIRTY)]


def test_unknown_export_name(image: Path) -> None:
    with qemu.QemuNbdServer(str(image)) as srv:
        with pytest.raises(NBDError, match="'nope' does not exist"):
            NBDClient.connect_unix(srv.socket_path, "nope")
        with pytest.raises(NBDError, match="nope"):
            NBDClient.connect_unix(srv.socket_path, "nope", ["base:allocation"])
        with NBDClient.connect_unix(srv.socket_path, "vol") as client:  # the server is still fine
            assert client.size == 48 * MiB


def test_client_errors_and_close(image: Path, tmp_path: Path) -> None:
    with pytest.raises(NBDError, match="cannot connect"):
        NBDClient.connect_unix(str(tmp_path / "no.sock"))
    with qemu.QemuNbdServer(str(image)) as srv:
        client = srv.connect()
        with pytest.raises(NBDError, match="read-only"):
            client.write(0, b"x")
        with pytest.raises(NBDError, match="outside the export"):
            client.read(client.size - 10, 20)
        assert client.read(client.size - 10, 10) == bytes(10)
        client.flush()
        client.close()
        client.close()
        assert client.closed
        with pytest.raises(NBDError, match="closed"):
            client.read(0, 1)


# -- scripted fake server -----------------------------------------------------------------------------

EXPORT_SIZE = 1 * MiB
ALLOC_ID = 7
OTHER_ID = 9


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _chunk(flags: int, ctype: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, flags, ctype, cookie, len(payload)) + payload


def _fake_server(sock: socket.socket, log: list[tuple[int, int, int]]) -> None:
    """Just enough of an NBD server: fixed newstyle, structured replies, two meta contexts,
    BLOCK_STATUS that describes only 4 KiB per reply, reads split in odd chunks, and an error
    for reads at offset 0x80000."""
    try:
        sock.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
        _recv_exact(sock, 4)
        while True:
            _, opt, length = struct.unpack(">QII", _recv_exact(sock, 16))
            _recv_exact(sock, length)

            def reply(rtype: int, payload: bytes = b"", opt: int = opt) -> None:
                sock.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, rtype, len(payload)) + payload)

            if opt == 8:
                reply(1)
            elif opt == 10:
                reply(4, struct.pack(">I", ALLOC_ID) + b"base:allocation")
                reply(4, struct.pack(">I", OTHER_ID) + b"qemu:other")
                reply(1)
            elif opt == 7:
                reply(3, struct.pack(">HQH", 0, EXPORT_SIZE, 1 | 4))  # HAS_FLAGS | SEND_FLUSH; read-only off
                reply(1)
                break
            else:
                reply(0x80000001)
        while True:
            _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", _recv_exact(sock, 28))
            log.append((cmd, offset, length))
            if cmd == 2:
                return
            if cmd == 1:  # write: simple reply
                _recv_exact(sock, length)
                sock.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
            elif cmd == 0 and offset == 0x80000:
                msg = b"simulated failure"
                err = struct.pack(">IH", 5, len(msg)) + msg + struct.pack(">Q", offset + 10)
                sock.sendall(_chunk(0, 0x8002, cookie, err) + _chunk(1, 0, cookie, b""))
            elif cmd == 0:
                # first third as data, then a hole, then the rest as data; NONE ends it
                a = length // 3
                b = length // 3
                out = _chunk(0, 1, cookie, struct.pack(">Q", offset) + bytes([0xAB]) * a)
                out += _chunk(0, 2, cookie, struct.pack(">QI", offset + a, b))
                out += _chunk(0, 1, cookie, struct.pack(">Q", offset + a + b) + bytes([0xCD]) * (length - a - b))
                sock.sendall(out + _chunk(1, 0, cookie, b""))
            elif cmd == 7:
                # other context: one long extent; base:allocation: just 4 KiB (less than asked)
                other = struct.pack(">III", OTHER_ID, EXPORT_SIZE, 0)
                n = min(4096, length)
                alloc = struct.pack(">III", ALLOC_ID, n, 3 if (offset // 4096) % 2 else 0)
                sock.sendall(_chunk(0, 5, cookie, other) + _chunk(1, 5, cookie, alloc))
            else:
                sock.sendall(struct.pack(">IIQ", 0x67446698, 95, cookie))  # EOPNOTSUPP
    except (EOFError, OSError):
        return
    finally:
        sock.close()


@pytest.fixture
def fake() -> Iterator[tuple[NBDClient, list[tuple[int, int, int]]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log: list[tuple[int, int, int]] = []
    thread = threading.Thread(target=_fake_server, args=(theirs, log), daemon=True)
    thread.start()
    client = NBDClient(ours, "", ["base:allocation", "qemu:other"])
    yield client, log
    client.close()
    thread.join(5)
    assert not thread.is_alive()


def test_fake_block_status_loops_until_range_is_covered(
    fake: tuple[NBDClient, list[tuple[int, int, int]]],
) -> None:
    client, log = fake
    assert client.meta_contexts == {"base:allocation": ALLOC_ID, "qemu:other": OTHER_ID}
    assert client.size == EXPORT_SIZE and not client.read_only and client.can_flush
    extents = client.block_status("base:allocation", 8192, 5 * 4096 + 100)
    assert extents == [
        (8192, 4096, 0),
        (12288, 4096, 3),
        (16384, 4096, 0),
        (20480, 4096, 3),
        (24576, 4096, 0),
        (28672, 100, 3),
    ]
    assert [entry[0] for entry in log] == [7] * 6
    assert log[0] == (7, 8192, 5 * 4096 + 100)
    # the other context answers everything at once, clipped to the request
    assert client.block_status("qemu:other", 100, 1000) == [(100, 1000, 0)]


def test_fake_structured_read_chunks_and_errors(fake: tuple[NBDClient, list[tuple[int, int, int]]]) -> None:
    client, _ = fake
    got = client.read(4096, 3000)
    assert got == bytes([0xAB]) * 1000 + bytes(1000) + bytes([0xCD]) * 1000
    buf = bytearray(b"\xff" * 9)
    client.read_into(0, memoryview(buf))
    assert buf == bytes([0xAB]) * 3 + bytes(3) + bytes([0xCD]) * 3
    with pytest.raises(NBDError, match=r"EIO.*simulated failure") as info:
        client.read(0x80000, 100)
    assert info.value.code == 5
    assert "failed at offset" in str(info.value)
    # the connection stays usable after a server-reported error
    assert client.read(0, 3) == bytes([0xAB, 0, 0xCD])
    client.write(10, b"hello")
    with pytest.raises(NBDError, match=r"NBD_CMD_FLUSH.*not supported"):
        client.flush()
