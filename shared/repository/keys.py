"""Chunk naming, compression and encryption: turning bytes into stored objects and back.

A stored object (chunk or manifest) is ``[type byte][payload]``: type ``0x00`` zstd,
``0x02`` stored as is (incompressible: zstd did not make it smaller, or a sample of it did not
compress, see :func:`looks_incompressible`), ``0x01``/``0x03`` the same inside AES-256-GCM as
``[nonce 12][ciphertext+tag]`` with the object's digest as associated data, so an object
cannot be swapped for another one. Digests are BLAKE3 of the plain bytes, keyed with the
repository's naming key when it has one (encrypted repositories do).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from shared.errors import IntegrityError
from shared.forksafe import ForkSafeLock

from .backends.base import Buffer

Lender = Callable[[int], memoryview | None]
"""Where a stored object is built: a writable buffer of the size asked for, or None."""

ZSTD = 0x00
ENCRYPTED = 0x01
STORED = 0x02
KEY_AAD = b"blockvault-repokey-v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
COMPRESSION_LEVEL = 1  # ~1.6x faster than 3 on text, as small on VM data (see README)
_BLAKE3_THREADS = 1  # chunks are hashed on several threads already
CHECK_PIECE = 1024 * 1024  # bytes read and decompressed at a time by ObjectCodec.check
ZSTD_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX: a frame's header is at most this long
SAMPLES = 8  # pieces of an object compressed to tell whether the whole is worth compressing
SAMPLE_BYTES = 4096  # each piece's length: 32 KiB of a 4 MiB chunk (0.8 %)
SAMPLE_MIN = 16 * SAMPLES * SAMPLE_BYTES  # smaller objects (manifests) are always compressed
SAMPLE_GAIN = 0.98  # a sample that zstd makes at least 2 % smaller counts as compressible


@dataclass(frozen=True)
class KeyMaterial:
    """The secrets of an encrypted repository (or none for a plain one)."""

    encryption_key: bytes | None
    naming_key: bytes | None

    @classmethod
    def generate(cls, *, encrypt: bool) -> KeyMaterial:
        if not encrypt:
            return cls(None, None)
        return cls(os.urandom(32), os.urandom(32))

    def wrap(self, passphrase: str) -> dict[str, Any]:
        """The key file's content: these keys sealed under a scrypt key of ``passphrase``."""
        assert self.encryption_key is not None
        salt, nonce = os.urandom(16), os.urandom(12)
        kek = _kdf(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        secret = self.encryption_key + (self.naming_key or b"")
        sealed = AESGCM(kek).encrypt(nonce, secret, KEY_AAD)
        return {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(salt),
            "nonce": _b64(nonce),
            "sealed": _b64(sealed),
            "naming": "blake3-keyed" if self.naming_key else "blake3",
        }

    @classmethod
    def unwrap(cls, keyfile: dict[str, Any], passphrase: str) -> KeyMaterial | None:
        """The keys sealed in ``keyfile``, or None when ``passphrase`` does not open it.

        scrypt runs once per process for a key file and passphrase (0.1 s of CPU, more under
        load): what it opened is kept in memory under an HMAC of both (see :func:`_cache_key`),
        so only the same key file with the same passphrase finds it again; a wrong passphrase
        misses and pays scrypt like the first time. Nothing is written to disk."""
        slot = _cache_key(keyfile, passphrase)
        with _UNWRAPPED_LOCK:
            cached = _UNWRAPPED.get(slot)
        if cached is not None:
            return cached
        keys = cls._unwrap(keyfile, passphrase)
        if keys is not None:
            with _UNWRAPPED_LOCK:
                if len(_UNWRAPPED) >= _UNWRAPPED_MAX:
                    _UNWRAPPED.pop(next(iter(_UNWRAPPED)))
                _UNWRAPPED[slot] = keys
        return keys

    @classmethod
    def _unwrap(cls, keyfile: dict[str, Any], passphrase: str) -> KeyMaterial | None:
        kek = _kdf(passphrase, _unb64(keyfile["salt"]), keyfile["n"], keyfile["r"], keyfile["p"])
        try:
            secret = AESGCM(kek).decrypt(_unb64(keyfile["nonce"]), _unb64(keyfile["sealed"]), KEY_AAD)
        except InvalidTag:
            return None
        return cls(secret[:32], secret[32:64] or None)


_UNWRAPPED: dict[bytes, KeyMaterial] = {}  # key files opened by this process (see unwrap)
_UNWRAPPED_LOCK = ForkSafeLock()  # a worker's threads open repositories while its pool forks
_UNWRAPPED_MAX = 256  # repositories a worker keeps open keys of; the oldest goes first
_CACHE_SECRET = os.urandom(32)  # this process's own: the cache's keys mean nothing elsewhere


def _cache_key(keyfile: dict[str, Any], passphrase: str) -> bytes:
    """HMAC-SHA256, under a random key of this process, of the key file (all of it: its salt
    names the repository's key, its sealed keys change with the passphrase) and the
    passphrase."""
    mac = hmac.new(_CACHE_SECRET, json.dumps(keyfile, sort_keys=True).encode(), hashlib.sha256)
    mac.update(b"\0")
    mac.update(passphrase.encode())
    return mac.digest()


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


class ObjectCodec:
    """Names, seals and opens a repository's objects. Thread-safe."""

    def __init__(self, keys: KeyMaterial) -> None:
        self.keys = keys
        self._aead = AESGCM(keys.encryption_key) if keys.encryption_key else None
        self._local = threading.local()

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def same_naming(self, other: ObjectCodec) -> bool:
        return self.keys.naming_key == other.keys.naming_key

    def digest(self, data: Buffer) -> bytes:
        hasher = self._hasher()
        hasher.update(data)
        return bytes(hasher.digest())

    def _hasher(self) -> Any:
        if self.keys.naming_key:
            return blake3.blake3(key=self.keys.naming_key, max_threads=_BLAKE3_THREADS)
        return blake3.blake3(max_threads=_BLAKE3_THREADS)

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = zstandard.ZstdDecompressor()
        return dec

    def encode(self, digest: bytes, data: Buffer) -> bytes | bytearray:
        """The stored form of ``data`` (whose digest is ``digest``), built with one copy."""
        return self._seal(digest, *self._pack(data))

    def encode_lent(self, digest: bytes, data: Buffer, lend: Lender) -> Buffer:
        """:meth:`encode` built in the buffer ``lend`` gives for its size (the file backend's
        O_DIRECT buffer, :meth:`Backend.lend_buffer`: written from where it lies), or in a new
        one when it gives None. Valid until the thread's next call of ``lend`` or until it is
        handed to :meth:`Backend.begin_put`."""
        kind, packed = self._pack(data)
        out = lend(self._sealed_size(packed))
        if out is None:
            return self._seal(digest, kind, packed)
        self._seal_into(out, digest, kind, packed)
        return out

    def _pack(self, data: Buffer) -> tuple[int, Buffer]:
        """The type and payload ``data`` is stored with: ``STORED`` as is when zstd would not
        make it smaller, or when a sample of it does not compress (:func:`looks_incompressible`:
        random or already compressed data, where zstd would spend its time for nothing);
        else ``ZSTD`` and its frame."""
        compressor = self._compressor()
        if looks_incompressible(compressor, data):
            return STORED, memoryview(data)
        packed = compressor.compress(data)
        if len(packed) >= len(data):
            return STORED, memoryview(data)
        return ZSTD, packed

    def _seal(self, digest: bytes, kind: int, packed: Buffer) -> bytes | bytearray:
        if self._aead is None:
            return bytes((kind,)) + packed
        out = bytearray(self._sealed_size(packed))
        self._seal_into(memoryview(out), digest, kind, packed)
        return out

    def _sealed_size(self, packed: Buffer) -> int:
        """The length of the stored object whose payload is ``packed``."""
        return 1 + len(packed) + (12 + 16 if self._aead is not None else 0)

    def _seal_into(self, out: memoryview, digest: bytes, kind: int, packed: Buffer) -> None:
        """Write the stored object (type, then ``packed`` as is or sealed) into ``out``, which
        is exactly :meth:`_sealed_size` long."""
        if self._aead is None:
            out[0] = kind
            out[1:] = packed
            return
        nonce = os.urandom(12)
        out[0] = kind | ENCRYPTED
        out[1:13] = nonce
        self._aead.encrypt_into(nonce, packed, digest, out[13:])

    def _peek(self, blob: bytes | bytearray, what: str) -> tuple[int, memoryview]:
        """The type (STORED or ZSTD) and the body of a stored object as it is (``[nonce]
        [ciphertext+tag]`` when sealed: then at least that long); IntegrityError for an empty
        object, an unknown type, or one sealed in a plain repository or plain in a sealed one."""
        if not blob:
            raise IntegrityError(detail=f"{what} is empty")
        kind, body = blob[0], memoryview(blob)[1:]
        if kind & ENCRYPTED:
            if self._aead is None:
                raise IntegrityError(detail=f"{what} is encrypted but the repository is not")
            if len(body) < 12 + 16:
                raise IntegrityError(detail=f"{what} is truncated")
        elif self._aead is not None:
            raise IntegrityError(detail=f"{what} is not encrypted in an encrypted repository")
        if kind & ~ENCRYPTED not in (STORED, ZSTD):
            raise IntegrityError(detail=f"{what} has unknown type byte {kind:#x}")
        return kind & ~ENCRYPTED, body

    def _decrypt_into(self, digest: bytes, body: memoryview, plain: Buffer, what: str) -> None:
        """Decrypt a sealed body (``[nonce 12][ciphertext+tag]``) into ``plain``, exactly as
        long as the ciphertext; IntegrityError unless its tag holds with ``digest``."""
        assert self._aead is not None
        try:
            self._aead.decrypt_into(body[:12], body[12:], digest, plain)
        except InvalidTag:
            raise IntegrityError(detail=f"{what} fails authentication (damaged or altered)") from None

    def _open(self, digest: bytes, blob: bytes | bytearray, what: str) -> tuple[int, memoryview]:
        """The type (STORED or ZSTD) and the packed body of a stored object, decrypted."""
        kind, body = self._peek(blob, what)
        if blob[0] & ENCRYPTED:
            plain = bytearray(len(body) - 12 - 16)
            self._decrypt_into(digest, body, plain, what)
            body = memoryview(plain)
        return kind, body

    def _unpack(self, digest: bytes, kind: int, body: memoryview, what: str) -> bytes | bytearray:
        """The plain bytes of an opened object, checked against ``digest``."""
        data: bytes | bytearray
        if kind == STORED:
            data = body.obj if isinstance(body.obj, bytearray) and len(body) == len(body.obj) else bytes(body)
        else:
            try:
                data = self._decompressor().decompress(body)
            except zstandard.ZstdError as exc:
                raise IntegrityError(detail=f"{what} does not decompress ({exc})") from None
            except MemoryError:  # a damaged frame header declaring a huge size
                raise IntegrityError(detail=f"{what} does not decompress (its frame declares too many bytes)") from None
        if self.digest(data) != digest:
            raise IntegrityError(detail=f"{what} does not match its digest")
        return data

    def decode_into(self, digest: bytes, blob: bytes | bytearray, out: memoryview, what: str) -> int:
        """The plain bytes of a stored object written into ``out`` (a writable buffer at least
        as long as they are), checked as :meth:`decode` checks them; their length. A
        compressed object is decompressed straight into ``out``, a stored one (incompressible)
        decrypted straight into it: no object-sized copy, no object-sized allocation for the
        plain bytes (a restore's aligned write buffer). On IntegrityError what ``out`` holds is
        undefined (GCM checks its tag after decrypting)."""
        kind, body = self._peek(blob, what)
        if kind == ZSTD:
            kind, body = self._open(digest, blob, what)
            del blob  # a sealed object's body is its decrypted copy: the sealed one can go
            size = _decompress_into(self._decompressor(), body, out, what)
        else:
            sealed = bool(blob[0] & ENCRYPTED)
            size = len(body) - 12 - 16 if sealed else len(body)
            if size > len(out):
                raise IntegrityError(detail=f"{what} has {size} bytes, more than {len(out)}")
            if sealed:  # decrypted straight into ``out``, its tag checked
                self._decrypt_into(digest, body, out[:size], what)
            else:
                out[:size] = body
        if self.digest(out[:size]) != digest:
            raise IntegrityError(detail=f"{what} does not match its digest")
        return size

    def decode(self, digest: bytes, blob: bytes | bytearray, what: str) -> bytes | bytearray:
        """The plain bytes of a stored object, checked against ``digest``; IntegrityError
        naming ``what`` when the object is damaged or was swapped."""
        kind, body = self._open(digest, blob, what)
        return self._unpack(digest, kind, body, what)

    def check(self, digest: bytes, source: IO[bytes], what: str, limit: int) -> None:
        """IntegrityError naming ``what`` unless the stored object read from ``source`` (a
        seekable binary file, at its start) opens as :meth:`decode` would open it, to at most
        ``limit`` plain bytes whose digest is ``digest``. A plain object is read, decompressed
        and hashed a piece at a time (memory stays about ``CHECK_PIECE`` plus zstd's window,
        whatever the object's size; a small object that would decompress to more than
        ``limit`` is stopped there); a sealed one is authenticated whole. At least as strict
        as :meth:`decode`: what passes here decodes there."""
        if self._aead is not None:  # GCM authenticates the whole object at once
            if len(self.decode(digest, source.read(), what)) > limit:
                raise IntegrityError(detail=f"{what} is over {limit} bytes")
            return
        head = source.read(1)
        self._open(digest, head, what)  # the type byte: refuses empty, sealed and unknown ones
        hasher = self._hasher()
        for piece in self._plain_pieces(head[0], source, what, limit):
            hasher.update(piece)
        if hasher.digest() != digest:
            raise IntegrityError(detail=f"{what} does not match its digest")

    def _plain_pieces(self, kind: int, source: IO[bytes], what: str, limit: int) -> Iterator[bytes]:
        """The plain bytes of an unsealed object's body (``source`` just past its type byte),
        a piece at a time; IntegrityError past ``limit`` bytes, or when zstd fails or gives
        other than the size its frame declares."""
        if kind == STORED:
            bound, pieces = limit, iter(lambda: source.read(CHECK_PIECE), b"")
        else:
            bound = _content_size(source, what, limit)
            reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHECK_PIECE, closefd=False)
            pieces = iter(lambda: reader.read(CHECK_PIECE), b"")
        total = 0
        try:
            for piece in pieces:
                total += len(piece)
                if total > bound:
                    raise IntegrityError(detail=f"{what} decodes to more than {bound} bytes")
                yield piece
        except zstandard.ZstdError as exc:
            raise IntegrityError(detail=f"{what} does not decompress ({exc})") from None
        if kind != STORED and total != bound:
            raise IntegrityError(detail=f"{what} does not decompress (its frame declares {bound} bytes, gave {total})")

    def recode(self, digest: bytes, blob: bytes, source: ObjectCodec, what: str) -> bytes | bytearray:
        """``blob`` as stored by ``source``, checked, in this codec's form (same naming). The
        compressed body is re-sealed as it is: only the encryption changes, never zstd."""
        kind, body = source._open(digest, blob, what)
        source._unpack(digest, kind, body, what)  # never spread a damaged object
        if source.keys == self.keys:
            return blob
        return self._seal(digest, kind, body)


def looks_incompressible(compressor: zstandard.ZstdCompressor, data: Buffer) -> bool:
    """Whether ``data`` (at least ``SAMPLE_MIN`` bytes; smaller is never skipped) is not worth
    compressing: ``SAMPLES`` pieces of ``SAMPLE_BYTES``, spread evenly over it, compressed as
    one by ``compressor`` come out less than 2 % smaller. Costs 0.8 % of compressing a 4 MiB
    chunk; spares zstd's pass over a random one (as Borg's ``auto`` compression does with
    lz4, on a sample instead of the whole). A chunk that is random apart from a compressible
    region smaller than the samples' spacing (512 KiB for 4 MiB) may be stored as is: it is
    then that region's compression that is lost, never a byte."""
    view = memoryview(data).cast("B")
    if len(view) < SAMPLE_MIN:
        return False
    step = len(view) // SAMPLES
    sample = b"".join(view[i * step : i * step + SAMPLE_BYTES] for i in range(SAMPLES))
    return len(compressor.compress(sample)) >= len(sample) * SAMPLE_GAIN


def _decompress_into(dctx: zstandard.ZstdDecompressor, body: memoryview, out: memoryview, what: str) -> int:
    """Decompress the zstd frame ``body`` into ``out``; its length. IntegrityError when the
    frame does not decompress, declares no size (the codec always writes it; its one-shot
    decode refuses a frame without), gives other than the size it declares, or more than
    ``out`` holds. (Streamed into ``out``: with the whole frame as one read this measured
    faster than one-shot decompression into a new object, the copy aside.)"""
    try:
        declared = zstandard.frame_content_size(body)
        if declared < 0:  # as ObjectCodec.decode: a chunk's frame declares its size
            raise IntegrityError(detail=f"{what} does not decompress (no content size in its frame)")
        if declared > len(out):
            raise IntegrityError(detail=f"{what} decodes to more than {len(out)} bytes")
        reader = dctx.stream_reader(body, read_size=max(len(body), 1))
        done = 0
        while done < declared:
            got = reader.readinto(out[done:declared])
            if not got:
                break
            done += got
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(detail=f"{what} does not decompress ({exc})") from None
    if done != declared or extra:
        raise IntegrityError(detail=f"{what} does not decompress (its frame declares {declared} bytes)")
    return declared


def _content_size(source: IO[bytes], what: str, limit: int) -> int:
    """The plain size a zstd frame (at ``source``'s position, which is kept) declares; like
    :meth:`ObjectCodec.decode`, a frame that does not declare it is refused, as is one over
    ``limit``."""
    start = source.tell()
    header = source.read(ZSTD_HEADER_MAX)
    source.seek(start)
    try:
        size = zstandard.get_frame_parameters(header).content_size
    except zstandard.ZstdError as exc:
        raise IntegrityError(detail=f"{what} does not decompress ({exc})") from None
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise IntegrityError(detail=f"{what} does not decompress (no content size in the frame header)")
    if size > limit:
        raise IntegrityError(detail=f"{what} declares {size} bytes, over {limit}")
    return int(size)


def dump_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
