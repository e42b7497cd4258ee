"""bridge.web.multipart: the streaming writer and the incremental reader."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import os
import random
from pathlib import Path

import pytest

from bridge.web.multipart import (
    CHUNK,
    FilePart,
    MultipartBody,
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    content_type_params,
    iter_events,
    read_parts,
)


def _files(folder: Path, contents: list[bytes]) -> list[FilePart]:
    parts = []
    for n, content in enumerate(contents):
        path = folder / f"part{n}.bin"
        path.write_bytes(content)
        parts.append(FilePart(path, len(content)))
    return parts


def _resplit(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, at = [], 0
    while at < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[at:at + size])
        at += size
    return chunks


TRICKY = [
    b"",  # an empty part
    b"\r\n--",  # the start of a delimiter, without the boundary
    b"--\r\n\r\n--",
    os.urandom(5000),
    b"\r\n" * 100,
]


def test_the_body_is_as_long_as_it_says_and_a_standard_parser_reads_it(tmp_path: Path) -> None:
    parts = _files(tmp_path, TRICKY)
    body = MultipartBody(parts)
    data = b"".join(body)
    assert len(data) == len(body)
    assert body.content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + data
    )
    got = [p.get_payload(decode=True) for p in message.iter_parts()]  # type: ignore[attr-defined]
    assert got == TRICKY
    assert all(p.get_content_type() == "application/dicom" for p in message.iter_parts())  # type: ignore[attr-defined]


def test_each_iteration_is_a_fresh_body(tmp_path: Path) -> None:
    body = MultipartBody(_files(tmp_path, [b"abc", b"def"]))
    assert b"".join(body) == b"".join(body)


def test_small_parts_are_gathered_into_large_chunks(tmp_path: Path) -> None:
    body = MultipartBody(_files(tmp_path, [os.urandom(10_000) for _ in range(300)]))
    chunks = list(body)
    assert len(chunks) <= len(body) // CHUNK + 1
    assert all(len(c) <= CHUNK for c in chunks)


def test_a_file_shorter_than_its_part_is_an_error(tmp_path: Path) -> None:
    (part,) = _files(tmp_path, [b"12345"])
    body = MultipartBody([FilePart(part.path, 10)])
    with pytest.raises(MultipartError, match="shorter"):
        b"".join(body)


def test_the_reader_finds_every_part_whatever_the_chunk_boundaries(tmp_path: Path) -> None:
    body = MultipartBody(_files(tmp_path, TRICKY))
    data = b"".join(body)
    rng = random.Random(7)
    for largest in (1, 2, 3, 5, 17, 100, 4096):
        parts = read_parts(_resplit(data, rng, largest), body.boundary)
        assert [p.body for p in parts] == TRICKY, f"chunks of up to {largest} bytes"
        assert all(p.headers == {"content-type": "application/dicom"} for p in parts)


def test_a_large_part_streams_through_the_reader_in_pieces(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(24):  # 24 MiB
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)
    body = MultipartBody([FilePart(big, big.stat().st_size), *_files(tmp_path, [b"tail"])])
    reader = MultipartReader(body.boundary)
    got, largest, ends, starts = hashlib.sha256(), 0, 0, 0
    first = True
    for chunk in body:
        for event in reader.feed(chunk):
            if isinstance(event, PartData):
                largest = max(largest, len(event.data))
                if first:
                    got.update(event.data)
            elif isinstance(event, PartEnd):
                ends += 1
                first = False
            elif isinstance(event, PartStart):
                starts += 1
    reader.close()
    assert (starts, ends) == (2, 2)
    assert got.hexdigest() == digest.hexdigest()
    assert largest <= CHUNK + 1024  # never the whole part at once


def test_preamble_padding_headers_and_epilogue_as_rfc_2046_allows() -> None:
    body = (b"this is a preamble\r\n--xyz   \r\nContent-Type: application/dicom\r\nX-Long: a\r\n b\r\n\r\n"
            b"one\r\n--xyz\r\n\r\ntwo\r\n--xyz--\r\nan epilogue --xyz")
    parts = read_parts([body], "xyz")
    assert [(p.headers, p.body) for p in parts] == [
        ({"content-type": "application/dicom", "x-long": "a b"}, b"one"), ({}, b"two"),
    ]
    # the body may open with the delimiter itself
    assert [p.body for p in read_parts([b"--b\r\n\r\nx\r\n--b--"], "b")] == [b"x"]


@pytest.mark.parametrize("body, message", [
    (b"--b\r\n\r\nunfinished", "before its closing boundary"),
    (b"--b junk\r\n\r\nx\r\n--b--", "text after a boundary"),
    (b"--b\r\nnot a header\r\n\r\nx\r\n--b--", "not a header line"),
])
def test_broken_bodies_are_errors(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        list(iter_events([body], "b"))


def test_content_type_parameters() -> None:
    media, params = content_type_params('Multipart/Related; type="application/dicom"; Boundary="a b"')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "a b"}
