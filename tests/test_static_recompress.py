"""StaticTree(recompress=...): native and lossless JPEG 2000 frames written in a lossless
syntax with pydicom's encoders, each frame file decoding to exactly the source's values;
what the encoder cannot take, and lossy sources, written as they are."""

from __future__ import annotations

import gzip
import json
import os
import typing
from pathlib import Path
from typing import Any

import forkserver
import numpy as np
import pydicom
import pytest
from corpus import TEST_FILES, ct_series, needs_codecs, with_uid, write_ct
from peers import REPO
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from bridge.config import StaticDestination, validate
from bridge.errors import ConfigError
from bridge.static.recompress import TARGETS
from bridge.static.tree import Result, StaticTree
from bridge.web.multipart import read_parts

pytestmark = needs_codecs

MEDIA = {"jpeg-ls": "image/jls", "rle": "image/dicom-rle", "jpeg2000-lossless": "image/jp2"}
AVAILABLE_TS = "00083002"


def fresh(source: Path, target: Path) -> Path:
    return with_uid(source, target, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                    SOPInstanceUID=generate_uid())


def instance_folder(root: Path, result: Result) -> Path:
    return (root / "studies" / result.study_uid / "series" / result.series_uid / "instances"
            / result.sop_instance_uid)


def frame_part(path: Path) -> tuple[str, str, bytes]:
    """A frame file's media type, transfer syntax label and bytes."""
    body = path.read_bytes()
    if path.suffix == ".gz":
        body = gzip.decompress(body)
    boundary = body.split(b"\r\n", 1)[0][2:].decode("ascii")
    parts = read_parts([body], boundary)
    assert len(parts) == 1
    content_type = {k.lower(): v for k, v in parts[0].headers.items()}["content-type"]
    media, label = content_type.split(";transfer-syntax=")
    return media, label, parts[0].body


def metadata(root: Path, result: Result) -> dict[str, Any]:
    found = json.loads(gzip.decompress((instance_folder(root, result) / "metadata.gz").read_bytes()))
    return dict(found[0])


def value(meta: dict[str, Any], tag: str) -> Any:
    return (meta.get(tag, {}).get("Value") or [None])[0]


def source_frames(path: Path) -> np.ndarray:
    """The source's pixel values as pydicom decodes them, one frame a row."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array
    return values if int(ds.get("NumberOfFrames", 1) or 1) > 1 else values[np.newaxis]


def decoded(body: bytes, syntax: str, meta: dict[str, Any]) -> np.ndarray:
    """One frame file's bytes decoded by pydicom's decoder for ``syntax``, described by
    the instance's metadata (as a viewer describes it)."""
    options = {"rows": value(meta, "00280010"), "columns": value(meta, "00280011"),
               "samples_per_pixel": value(meta, "00280002"), "bits_allocated": value(meta, "00280100"),
               "bits_stored": value(meta, "00280101"), "pixel_representation": value(meta, "00280103"),
               "photometric_interpretation": value(meta, "00280004"), "number_of_frames": 1,
               "planar_configuration": value(meta, "00280006") or 0}
    array, _ = get_decoder(UID(syntax)).as_array(encapsulate([body]), index=0, as_rgb=False, **options)
    return array


def multiframe(path: Path, frames: int = 3, size: int = 64) -> Path:
    pixels = np.random.default_rng(7).integers(0, 4096, (frames, size, size), dtype=np.uint16)
    write_ct(path, generate_uid(), generate_uid(), 1, pixels[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_recompressed(root: Path, result: Result, source: Path, target: str) -> dict[str, Any]:
    """Every frame file of ``result`` is in ``target`` and decodes to the source's values."""
    assert result.status == "added" and not result.warning, result
    syntax = str(TARGETS[target])
    meta = metadata(root, result)
    assert value(meta, AVAILABLE_TS) == syntax
    assert meta["7FE00010"] == {"vr": meta["7FE00010"]["vr"], "BulkDataURI": "./frames"}
    expected = source_frames(source)
    folder = instance_folder(root, result) / "frames"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.mht" for n in range(1, len(expected) + 1))
    for number, values in enumerate(expected, start=1):
        media, label, body = frame_part(folder / f"{number}.mht")
        assert (media, label) == (MEDIA[target], syntax)
        np.testing.assert_array_equal(decoded(body, label, meta), values)
    return meta


@pytest.mark.parametrize("target", list(TARGETS))
def test_native_series_and_multiframe_decode_to_the_same_values(tmp_path: Path, target: str) -> None:
    sources = [*ct_series(tmp_path / "ct", 3), multiframe(tmp_path / "multi.dcm")]
    root = tmp_path / "tree"
    results = StaticTree(root, recompress=target).add(sources)
    for result, source in zip(results, sources, strict=True):
        meta = assert_recompressed(root, result, source, target)
        assert value(meta, "00280004") == "MONOCHROME2"
        assert "00282110" not in meta  # Lossy Image Compression: nothing was lost
    series = json.loads(gzip.decompress((root / "studies" / results[0].study_uid / "series" / results[0].series_uid
                                         / "metadata.gz").read_bytes()))
    assert {value(m, AVAILABLE_TS) for m in series} == {str(TARGETS[target])}
    assert value(metadata(root, results[3]), "00280008") == 3


def test_signed_big_endian_and_color_sources(tmp_path: Path) -> None:
    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "examples_rgb_color.dcm", "SC_rgb_jpeg_dcmd.dcm"]
    sources = [fresh(TEST_FILES / n, tmp_path / n) for n in names]
    root = tmp_path / "tree"
    for result, source in zip(StaticTree(root, recompress="jpeg-ls").add(sources), sources, strict=True):
        assert_recompressed(root, result, source, "jpeg-ls")


def test_lossless_jpeg2000_is_decoded_and_recompressed(tmp_path: Path) -> None:
    mono = fresh(TEST_FILES / "MR_small_jp2klossless.dcm", tmp_path / "mono.dcm")
    rct = fresh(TEST_FILES / "GDCMJ2K_TextGBR.dcm", tmp_path / "rct.dcm")  # YBR_RCT
    root = tmp_path / "tree"
    results = StaticTree(root, recompress="jpeg-ls").add([mono, rct])
    assert_recompressed(root, results[0], mono, "jpeg-ls")
    meta = assert_recompressed(root, results[1], rct, "jpeg-ls")
    assert value(meta, "00280004") == "RGB"  # the decoder undid the component transform
    assert value(meta, "00280006") in (None, 0)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossy_and_other_compressed_sources_are_kept(tmp_path: Path, name: str) -> None:
    """JPEG baseline, JPEG 2000 flagged lossy, and the target syntax itself: the frames as
    they were, silently."""
    source = fresh(TEST_FILES / name, tmp_path / name)
    root = tmp_path / "tree"
    [result] = StaticTree(root, recompress="jpeg-ls").add([source])
    assert result.status == "added" and result.warning == ""
    syntax = str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert value(metadata(root, result), AVAILABLE_TS) == syntax
    _, label, body = frame_part(instance_folder(root, result) / "frames" / "1.mht")
    assert label == syntax
    ds = pydicom.dcmread(source)
    assert body == next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))


def float_image(path: Path) -> Path:
    write_ct(path, generate_uid(), generate_uid(), 1, np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(-1, 1, 64, dtype="<f4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def out_of_range(path: Path) -> Path:
    """12 bits stored, but a value with bit 15 set (an overlay in the high bits, say)."""
    pixels = np.full((16, 16), 100, np.uint16)
    pixels[0, 0] = 0x8001
    return write_ct(path, generate_uid(), generate_uid(), 1, pixels)


@pytest.mark.parametrize(("make", "warning"), [
    (lambda d: fresh(TEST_FILES / "liver_1frame.dcm", d / "seg.dcm"), "Bits Allocated 1"),
    (lambda d: float_image(d / "float.dcm"), "float pixel data"),
    (lambda d: fresh(TEST_FILES / "SC_ybr_full_422_uncompressed.dcm", d / "422.dcm"), "YBR_FULL_422"),
    (lambda d: out_of_range(d / "high.dcm"), "cannot be encoded"),
], ids=["1-bit", "float", "ybr-422", "values-above-bits-stored"])
def test_what_the_encoder_cannot_take_is_written_as_it_is(tmp_path: Path, make: Any, warning: str) -> None:
    source = make(tmp_path)
    root = tmp_path / "tree"
    [result] = StaticTree(root, recompress="jpeg-ls").add([source])
    assert result.status == "added", result.reason
    assert warning in result.warning and "written as it is" in result.warning
    assert value(metadata(root, result), AVAILABLE_TS) == str(pydicom.dcmread(source).file_meta.TransferSyntaxUID)
    frames = sorted((instance_folder(root, result) / "frames").iterdir())
    assert frames and all(p.name.endswith(".mht.gz") for p in frames)
    assert {frame_part(p)[:2] for p in frames} == {("application/octet-stream", str(ExplicitVRLittleEndian))}


def test_off_by_default_and_changing_the_setting_converts_again(tmp_path: Path) -> None:
    [source] = ct_series(tmp_path / "ct", 1)
    root = tmp_path / "tree"
    [plain] = StaticTree(root).add([source])
    folder = instance_folder(root, plain) / "frames"
    assert [p.name for p in folder.iterdir()] == ["1.mht.gz"]
    assert frame_part(folder / "1.mht.gz")[:2] == ("application/octet-stream", str(ExplicitVRLittleEndian))
    assert value(metadata(root, plain), AVAILABLE_TS) == str(ExplicitVRLittleEndian)

    [again] = StaticTree(root, recompress="jpeg-ls").add([source])
    assert again.status == "added"
    assert [p.name for p in folder.iterdir()] == ["1.mht"]
    assert StaticTree(root, recompress="jpeg-ls").add([source])[0].status == "unchanged"
    assert StaticTree(root).add([source])[0].status == "added"
    assert [p.name for p in folder.iterdir()] == ["1.mht.gz"]


def test_convert_command_recompresses_and_lists_warnings(tmp_path: Path) -> None:
    sources = ct_series(tmp_path / "in", 2)
    seg = fresh(TEST_FILES / "liver_1frame.dcm", tmp_path / "in" / "seg.dcm")
    out = tmp_path / "tree"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = forkserver.run(["convert", "--recompress", "jpeg-ls", str(tmp_path / "in"), "-o", str(out)], env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 instances added, 0 unchanged, 2 studies, 0 errors, 0 skipped (not DICOM)"
    assert f"{seg}: not recompressed to JPEG-LS Lossless Image Compression: " in proc.stderr
    assert len(list(out.rglob("frames/1.mht"))) == len(sources)
    bad = forkserver.run(["convert", "--recompress", "jpeg-lossy", str(sources[0]), "-o", str(out)], env=env,
                         timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_destination_setting_matches_the_targets(tmp_path: Path) -> None:
    literal = next(a for a in typing.get_args(StaticDestination.model_fields["recompress"].annotation)
                   if a is not type(None))
    assert set(typing.get_args(literal)) == set(TARGETS)
    config = {"destinations": {"web": {"type": "static", "path": str(tmp_path), "recompress": "rle"}},
              "rules": [{"name": "all", "store": ["web"]}]}
    found = validate(config, tmp_path).destinations["web"]
    assert isinstance(found, StaticDestination) and found.recompress == "rle"
    config["destinations"]["web"]["recompress"] = "jpeg"
    with pytest.raises(ConfigError, match="recompress"):
        validate(config, tmp_path)
