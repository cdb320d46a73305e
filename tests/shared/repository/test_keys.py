"""ObjectCodec.check: what a storage server runs on a plain repository's objects. It passes
what encode writes, refuses damaged, swapped and oversized objects a piece at a time, and
never passes an object decode would refuse."""

from __future__ import annotations

import base64
import io
import os

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import IntegrityError
from shared.repository import keys as keys_module
from shared.repository.keys import STORED, ZSTD, KeyMaterial, ObjectCodec

PLAIN = ObjectCodec(KeyMaterial(None, None))
LIMIT = 256 * 1024


def sealed(codec: ObjectCodec, data: bytes) -> tuple[bytes, bytes]:
    digest = codec.digest(data)
    return digest, bytes(codec.encode(digest, data))


def check(blob: bytes, digest: bytes, limit: int = LIMIT, codec: ObjectCodec = PLAIN) -> None:
    codec.check(digest, io.BytesIO(blob), "chunk x", limit)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"a", STORED), (b"text " * 50_000, ZSTD), (os.urandom(LIMIT), STORED), (bytes(LIMIT), ZSTD)],
    ids=["byte", "text", "random", "zeros"],
)
def test_what_encode_writes_passes(data: bytes, kind: int) -> None:
    digest, blob = sealed(PLAIN, data)
    assert blob[0] == kind
    check(blob, digest, limit=len(data))
    with pytest.raises(IntegrityError, match=r"more than|over"):
        check(blob, digest, limit=len(data) - 1)


def frame(data: bytes, **options: object) -> bytes:
    return bytes((ZSTD,)) + zstandard.ZstdCompressor(**options).compress(data)  # type: ignore[arg-type]


DATA = b"the chunk's bytes " * 1000
DIGEST, BLOB = sealed(PLAIN, DATA)
ZEROS = bytes(64 * 1024 * 1024)
REFUSED = {
    "empty": (b"", DIGEST, "is empty"),
    "unknown type": (b"\x06" + BLOB[1:], DIGEST, "unknown type byte"),
    "sealed in a plain repository": (b"\x01" + BLOB[1:], DIGEST, "encrypted but the repository is not"),
    "swapped": (BLOB, PLAIN.digest(b"another chunk"), "does not match its digest"),
    "truncated": (BLOB[:-7], DIGEST, "does not decompress"),
    "corrupt": (BLOB[:20] + bytes(len(BLOB) - 20), DIGEST, "does not decompress"),
    "trailing garbage": (BLOB + b"garbage", DIGEST, "does not decompress"),
    "no content size": (frame(DATA, write_content_size=False), DIGEST, "no content size"),
    "a bomb": (frame(ZEROS), PLAIN.digest(ZEROS), "declares 67108864 bytes, over"),
    "stored, too long": (bytes((STORED,)) + os.urandom(LIMIT + 1), DIGEST, "decodes to more than"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_damaged_swapped_and_oversized_objects_are_refused(name: str) -> None:
    blob, digest, message = REFUSED[name]
    with pytest.raises(IntegrityError, match=f"chunk x .*{message}"):
        check(blob, digest)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=4096),
    cut=st.integers(min_value=0, max_value=4096),
    tail=st.binary(max_size=16),
    flip=st.integers(min_value=0, max_value=5000),
    compressible=st.booleans(),
)
def test_nothing_check_passes_fails_to_decode(
    data: bytes, cut: int, tail: bytes, flip: int, compressible: bool
) -> None:
    if compressible:
        data = data[:8] * 100
    digest, blob = sealed(PLAIN, data)
    damaged = bytearray(blob[: max(1, len(blob) - cut)] + tail)
    if flip < len(damaged):
        damaged[flip] ^= 0x40
    try:
        check(bytes(damaged), digest, limit=len(data) + 64)
    except IntegrityError:
        return
    assert PLAIN.decode(digest, bytes(damaged), "chunk x") == data


def test_an_encrypted_object_is_authenticated_whole() -> None:
    codec = ObjectCodec(KeyMaterial.generate(encrypt=True))
    digest, blob = sealed(codec, b"secret " * 1000)
    check(blob, digest, codec=codec)
    tampered = blob[:-1] + bytes((blob[-1] ^ 1,))
    with pytest.raises(IntegrityError, match="authentication"):
        check(tampered, digest, codec=codec)
    with pytest.raises(IntegrityError, match="encrypted but the repository is not"):
        check(blob, digest)  # a plain codec never opens a sealed object


class _CountingKdf:
    """The real scrypt, counted: how often a passphrase was stretched."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = keys_module._kdf

    def __call__(self, *args: object) -> bytes:
        self.calls += 1
        return self.real(*args)  # type: ignore[arg-type]


def test_a_key_file_is_opened_with_scrypt_once_per_process_and_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    material = KeyMaterial.generate(encrypt=True)
    keyfile = material.wrap("right horse")
    rewrapped = material.wrap("new horse")  # a changed passphrase rewrites the key file
    kdf = _CountingKdf()
    monkeypatch.setattr(keys_module, "_kdf", kdf)
    assert KeyMaterial.unwrap(keyfile, "right horse") == material
    assert KeyMaterial.unwrap(keyfile, "right horse") == material
    assert kdf.calls == 1
    # a wrong passphrase never finds what the right one opened: it pays scrypt and fails, each time
    assert KeyMaterial.unwrap(keyfile, "wrong horse") is None
    assert KeyMaterial.unwrap(keyfile, "wrong horse") is None
    assert KeyMaterial.unwrap(keyfile, "right horse ") is None
    assert kdf.calls == 4
    # the same keys under the new key file are a new entry
    assert KeyMaterial.unwrap(rewrapped, "right horse") is None
    assert KeyMaterial.unwrap(rewrapped, "new horse") == material
    assert kdf.calls == 6


def test_a_damaged_key_file_is_not_opened_from_the_cache() -> None:
    material = KeyMaterial.generate(encrypt=True)
    keyfile = material.wrap("pass")
    assert KeyMaterial.unwrap(keyfile, "pass") == material
    damaged = dict(keyfile, sealed=base64.b64encode(b"\0" * 80).decode())
    assert KeyMaterial.unwrap(damaged, "pass") is None


@pytest.mark.parametrize("data", [os.urandom(LIMIT), b"text " * 50_000], ids=["stored", "compressed"])
def test_decode_into_authenticates_a_sealed_object_it_decrypts_into_the_buffer(data: bytes) -> None:
    codec = ObjectCodec(KeyMaterial.generate(encrypt=True))
    digest, blob = sealed(codec, data)
    out = memoryview(bytearray(len(data)))
    assert codec.decode_into(digest, blob, out, "chunk x") == len(data)
    assert bytes(out) == data
    damaged = {
        "ciphertext": blob[:40] + bytes((blob[40] ^ 1,)) + blob[41:],
        "tag": blob[:-1] + bytes((blob[-1] ^ 1,)),
        "nonce": blob[:1] + bytes((blob[1] ^ 1,)) + blob[2:],
    }
    for name, bad in damaged.items():
        with pytest.raises(IntegrityError, match="authentication"):
            codec.decode_into(digest, bad, out, f"chunk {name}")
    with pytest.raises(IntegrityError, match="authentication"):  # the digest is its associated data
        codec.decode_into(codec.digest(b"another"), blob, out, "chunk x")
    with pytest.raises(IntegrityError, match="more than"):
        codec.decode_into(digest, blob, out[:-1], "chunk x")
    with pytest.raises(IntegrityError, match="not encrypted"):
        codec.decode_into(digest, bytes((blob[0] & ~1,)) + data, out, "chunk x")


CHUNK = 4 * 1024 * 1024
ENCRYPTED = ObjectCodec(KeyMaterial.generate(encrypt=True))


def random_with_text(text_at: int, text_bytes: int) -> bytes:
    data = bytearray(os.urandom(CHUNK))
    data[text_at : text_at + text_bytes] = (b"some log text, rather repetitive " * (text_bytes // 33 + 1))[:text_bytes]
    return bytes(data)


@pytest.mark.parametrize("codec", [PLAIN, ENCRYPTED], ids=["plain", "encrypted"])
@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (os.urandom(CHUNK), STORED),  # the sample does not compress: zstd never sees the whole
        (random_with_text(1024 * 1024, 1024 * 1024), ZSTD),  # a sampled compressible region
        (random_with_text(8192, 256 * 1024), STORED),  # between two samples: its compression lost
        (b"text " * (CHUNK // 5), ZSTD),
    ],
    ids=["random", "random-with-sampled-text", "random-with-unsampled-text", "text"],
)
def test_a_chunk_whose_sample_does_not_compress_is_stored_as_is_and_opens_byte_for_byte(
    codec: ObjectCodec, data: bytes, kind: int
) -> None:
    digest, blob = sealed(codec, data)
    assert blob[0] & ~keys_module.ENCRYPTED == kind
    assert codec.decode(digest, blob, "chunk x") == data
    out = bytearray(CHUNK)
    assert codec.decode_into(digest, blob, memoryview(out), "chunk x") == len(data)
    assert out[: len(data)] == data
    check(blob, digest, limit=CHUNK, codec=codec)


def test_the_sample_test_reads_evenly_spread_pieces_and_spares_small_objects() -> None:
    compressor = zstandard.ZstdCompressor(level=keys_module.COMPRESSION_LEVEL)
    assert keys_module.looks_incompressible(compressor, os.urandom(CHUNK))
    assert not keys_module.looks_incompressible(compressor, bytes(CHUNK))
    small = os.urandom(keys_module.SAMPLE_MIN - 1)  # a manifest-sized object: zstd decides
    assert not keys_module.looks_incompressible(compressor, small)
    _, blob = sealed(PLAIN, small)
    assert blob[0] == STORED  # stored as is all the same: zstd did not make it smaller
    last = random_with_text(CHUNK - CHUNK // keys_module.SAMPLES, keys_module.SAMPLE_BYTES)
    assert not keys_module.looks_incompressible(compressor, last)  # the last piece is sampled
