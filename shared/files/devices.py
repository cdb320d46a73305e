"""Devices and partitions: a backup's bytes as the filesystem readers see them.

:class:`NbdDevice` reads the export in aligned blocks through a small cache (filesystem
libraries read a few KiB at a time); :class:`Slice` is a byte range of another device;
:class:`LogicalVolume` an LVM logical volume (libyal's libvslvm). :func:`partitions` finds
where filesystems may be: the partitions of an MBR or GPT table (The Sleuth Kit's volume
system), the logical volumes of an LVM physical volume, or the whole device, and names the
filesystem on each from its signature.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import pytsk3
import pyvslvm

from shared.repository.nbd import NBDClient

BLOCK = 1024 * 1024
CACHE_BLOCKS = 64
SECTOR = 512


class Device(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class NbdDevice:
    """An NBD export, read in aligned ``BLOCK``-sized pieces kept in an LRU of
    ``CACHE_BLOCKS``; reads larger than a block go straight through."""

    def __init__(self, client: NBDClient) -> None:
        self.client = client
        self.size = client.size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _block(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is None:
            start = index * BLOCK
            data = self.client.read(start, min(BLOCK, self.size - start))
            self._cache[index] = data
            if len(self._cache) > CACHE_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return data

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        with self._lock:
            if length >= BLOCK:
                return self.client.read(offset, length)
            first, last = offset // BLOCK, (offset + length - 1) // BLOCK
            if first == last:
                start = offset - first * BLOCK
                return self._block(first)[start : start + length]
            parts = [self._block(i) for i in range(first, last + 1)]
            joined = b"".join(parts)
            start = offset - first * BLOCK
            return joined[start : start + length]


class Slice:
    """``size`` bytes of ``device`` from ``offset``."""

    def __init__(self, device: Device, offset: int, size: int) -> None:
        self.device, self.offset, self.size = device, offset, max(0, min(size, device.size - offset))

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return self.device.read(self.offset + offset, length) if length else b""


class FileView(io.RawIOBase):
    """A device as a read-only, seekable binary file (what libyal's readers take)."""

    def __init__(self, device: Device) -> None:
        super().__init__()
        self.device = device
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.device.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def get_size(self) -> int:
        return self.device.size

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.device.size - self.position
        data = self.device.read(self.position, size)
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class LogicalVolume:
    """An LVM logical volume, read through libvslvm (linear and striped segments)."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume
        self.size = int(volume.size)
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        with self._lock:
            return bytes(self.volume.read_buffer_at_offset(length, offset))


class TskImage(pytsk3.Img_Info):  # type: ignore[misc]
    """A device as The Sleuth Kit's image (its Python-callback image type)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def close(self) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read(offset, size)

    def get_size(self) -> int:
        return self.device.size


@dataclass
class Partition:
    """One place a filesystem may be: its index, how it was found, where, and what is there."""

    index: int
    name: str
    offset: int
    size: int
    filesystem: str | None  # ext, xfs, fat, ntfs, lvm (a physical volume), or None
    device: Device

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "filesystem": self.filesystem,
        }


def sniff(device: Device) -> str | None:
    """The filesystem (or LVM physical volume) whose signature starts ``device``."""
    head = device.read(0, 4096)
    if len(head) < 1024:
        return None
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[512 + 24 : 512 + 32] == b"LVM2 001" or head[536:544] == b"LVM2 001":
        return "lvm"
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return "fat"
    return None


def _table(device: Device) -> list[tuple[int, int, str]]:
    """(offset, size, name) of the allocated partitions of an MBR or GPT table; [] for none."""
    try:
        volumes = pytsk3.Volume_Info(TskImage(device))
    except OSError:
        return []
    block = int(volumes.info.block_size) or SECTOR
    kind = "gpt" if int(volumes.info.vstype) == pytsk3.TSK_VS_TYPE_GPT else "mbr"
    found, logical = [], 5  # as Linux numbers them: primaries by slot, logical ones from 5 on
    for part in volumes:
        if int(part.flags) & pytsk3.TSK_VS_PART_FLAG_ALLOC and int(part.len) > 0:
            if kind == "mbr" and int(part.table_num) > 0:
                number, logical = logical, logical + 1
            else:
                number = int(part.slot_num) + 1
            found.append((int(part.start) * block, int(part.len) * block, f"{kind}{number}"))
    return found


def _logical_volumes(device: Device) -> list[tuple[str, Device]]:
    handle = pyvslvm.handle()
    view = FileView(device)
    handle.open_file_object(view)
    handle.open_physical_volume_files_as_file_objects([view])
    group = handle.get_volume_group()
    return [(f"{group.name}/{lv.name}", LogicalVolume(lv)) for lv in group.logical_volumes]


def partitions(device: Device) -> list[Partition]:
    """Every place a filesystem may be on ``device`` (see the module docstring)."""
    regions: list[tuple[int, int, str, Device]] = [
        (offset, size, name, Slice(device, offset, size)) for offset, size, name in _table(device)
    ]
    if not regions:
        regions = [(0, device.size, "disk", device)]
    found: list[Partition] = []
    for offset, size, name, region in regions:
        kind = sniff(region)
        found.append(Partition(len(found), name, offset, size, kind, region))
        if kind == "lvm":
            try:
                volumes = _logical_volumes(region)
            except OSError:
                continue  # an unreadable physical volume: listed as one, with nothing in it
            for lv_name, lv in volumes:
                found.append(Partition(len(found), lv_name, offset, lv.size, sniff(lv), lv))
    return found
