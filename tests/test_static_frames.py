"""bridge.static.frames: every frame of pydicom's test files, as a frame file holds it."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import as_pixel_options, get_decoder, get_encoder, pack_bits
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import (
    MPEG4HP41,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from bridge.errors import Unparseable
from bridge.static.frames import (
    NATIVE_SYNTAX,
    Frame,
    frames,
    multipart_content_type,
    multipart_frame,
    new_boundary,
)
from bridge.web.multipart import content_type_params, read_parts

NATIVE = [
    "CT_small.dcm",  # single-frame CT, explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "liver_1frame.dcm",  # 1 bit allocated (a segmentation)
    "liver_expb_1frame.dcm",
    "SC_ybr_full_422_uncompressed.dcm",  # 2 samples a pixel, not 3
    "examples_rgb_color.dcm",
    "ExplVR_BigEnd.dcm",  # RGB, planar configuration 1, 8 bits in OB
    "SC_rgb_small_odd.dcm",  # 27 bytes
    "SC_rgb_small_odd_big_endian.dcm",  # 8 bits in OW, odd length
    "rtdose.dcm",  # 15 frames of 32 bits, implicit VR
    "rtdose_expb.dcm",
    "image_dfl.dcm",  # deflated
    "emri_small.dcm",  # 10 frames (pydicom-data only)
    "emri_small_big_endian.dcm",
]
ENCAPSULATED = [
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "examples_ybr_color.dcm",  # 30 JPEG baseline frames
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "emri_small_jpeg_2k_lossless.dcm",  # 10 frames (pydicom-data only)
    "MR_small_RLE.dcm",
    "rtdose_rle.dcm",  # 15 frames
    "SC_rgb_rle_2frame.dcm",
    "emri_small_RLE.dcm",
]
BIG_AND_LITTLE = [
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("rtdose_expb.dcm", "rtdose.dcm"),
    ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
    ("liver_expb_1frame.dcm", "liver_1frame.dcm"),
    ("emri_small_big_endian.dcm", "emri_small.dcm"),
]
MEDIA_TYPES = {
    "SC_rgb_jpeg_dcmtk.dcm": "image/jpeg",
    "JPGExtended.dcm": "image/jpeg",
    "SC_rgb_jpeg_gdcm.dcm": "image/jpeg",
    "MR_small_jpeg_ls_lossless.dcm": "image/jls",
    "JPEGLSNearLossless_16.dcm": "image/jls",
    "MR_small_jp2klossless.dcm": "image/jp2",
    "JPEG2000.dcm": "image/jp2",
    "MR_small_RLE.dcm": "image/dicom-rle",
}


def _testfile(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not bundled with pydicom (pydicom-data, which cannot be downloaded here)")
    return Path(str(found))


def _frame_arrays(ds: Dataset) -> list[np.ndarray]:
    """pydicom's own decoding of every frame."""
    array = ds.pixel_array
    return list(array) if get_nr_frames(ds) > 1 else [array]


def _decode_one(frame: Frame, ds: Dataset) -> np.ndarray:
    """A frame's bytes decoded by pydicom as the one frame of an image in the frame's syntax."""
    options: dict[str, Any] = as_pixel_options(ds, number_of_frames=1, pixel_keyword="PixelData")
    syntax = UID(frame.transfer_syntax)
    data = encapsulate([frame.data]) if syntax.is_encapsulated else frame.data
    array, _ = get_decoder(syntax).as_array(data, **options)
    return array


def _write(path: Path, syntax: UID, pixel_data: bytes, *, rows: int, columns: int, number_of_frames: int,
           bits: int = 16, samples: int = 1, photometric: str = "MONOCHROME2", vr: str = "OW",
           encapsulated: bool = False, extra: dict[str, tuple[str, Any]] | None = None) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, number_of_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for keyword, (element_vr, value) in (extra or {}).items():
        setattr(ds, keyword, value)
        ds[keyword].VR = element_vr
    ds.add_new(0x7FE00010, vr, pixel_data)
    if encapsulated:
        ds["PixelData"].is_undefined_length = True
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# -- native ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NATIVE)
def test_native_frames_are_little_endian_and_decode_as_pydicom_decodes_the_file(name: str) -> None:
    path = _testfile(name)
    ds = pydicom.dcmread(path)
    found = list(frames(path))
    assert [f.number for f in found] == list(range(1, get_nr_frames(ds) + 1))
    assert {(f.content_type, f.transfer_syntax) for f in found} == {("application/octet-stream", NATIVE_SYNTAX)}
    for frame, expected in zip(found, _frame_arrays(ds), strict=True):
        np.testing.assert_array_equal(_decode_one(frame, ds), expected)


@pytest.mark.parametrize("name", [n for n in NATIVE if "big" not in n.lower() and "expb" not in n])
def test_little_endian_frames_are_pydicoms_own_cut(name: str) -> None:
    path = _testfile(name)
    ds = pydicom.dcmread(path)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    expected = [bytes(decoder.as_buffer(ds, index=i)[0]) for i in range(get_nr_frames(ds))]
    assert [f.data for f in frames(path)] == expected


@pytest.mark.parametrize(("big", "little"), BIG_AND_LITTLE)
def test_big_endian_frames_equal_the_little_endian_files(big: str, little: str) -> None:
    big_path, little_path = _testfile(big), _testfile(little)
    assert [f.data for f in frames(big_path)] == [f.data for f in frames(little_path)]


def test_ybr_full_422_frames_hold_two_samples_a_pixel(tmp_path: Path) -> None:
    one = Path(_testfile("SC_ybr_full_422_uncompressed.dcm"))
    ds = pydicom.dcmread(one)
    first = ds.PixelData
    second = first[1:] + first[:1]
    path = _write(tmp_path / "ybr.dcm", ExplicitVRLittleEndian, first + second, rows=ds.Rows, columns=ds.Columns,
                  number_of_frames=2, bits=8, samples=3, photometric="YBR_FULL_422", vr="OB")
    assert [f.data for f in frames(path)] == [first, second]
    assert len(first) == ds.Rows * ds.Columns * 2


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_1_bit_frames_off_byte_boundaries_start_on_their_own_first_bit(tmp_path: Path, syntax: UID) -> None:
    # 3 x 5 = 15 pixels a frame: frame 2 begins at bit 7 of byte 1, frame 3 at bit 6 of byte 3
    rng = np.random.default_rng(18)
    masks = rng.integers(0, 2, size=(5, 3, 5), dtype=np.uint8)
    path = _write(tmp_path / "seg.dcm", syntax, pack_bits(masks), rows=3, columns=5, number_of_frames=5,
                  bits=1, vr="OB")
    found = list(frames(path))
    assert [f.data for f in found] == [pack_bits(mask.ravel(), pad=False) for mask in masks]
    assert all(len(f.data) == 2 for f in found)  # 15 bits, the 16th zero
    ds = pydicom.dcmread(path)
    for frame, mask in zip(found, masks, strict=True):
        np.testing.assert_array_equal(_decode_one(frame, ds), mask)


def test_big_endian_values_are_swapped_by_bits_allocated(tmp_path: Path) -> None:
    values = np.arange(2 * 4 * 3, dtype=np.uint32).reshape(2, 4, 3) * 0x01020304
    path = _write(tmp_path / "be32.dcm", ExplicitVRBigEndian, values.astype(">u4").tobytes(), rows=4, columns=3,
                  number_of_frames=2, bits=32)
    assert [f.data for f in frames(path)] == [v.astype("<u4").tobytes() for v in values]


def test_a_file_without_pixel_data_has_no_frames() -> None:
    assert list(frames(_testfile("rtplan.dcm"))) == []


# -- encapsulated ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCAPSULATED)
def test_encapsulated_frames_are_pydicoms_frames_in_the_files_own_syntax(name: str) -> None:
    path = _testfile(name)
    ds = pydicom.dcmread(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    found = list(frames(path))
    expected = list(generate_frames(ds.PixelData, number_of_frames=get_nr_frames(ds)))
    assert [f.data for f in found] == expected
    assert [f.number for f in found] == list(range(1, get_nr_frames(ds) + 1))
    assert {f.transfer_syntax for f in found} == {syntax}
    if name in MEDIA_TYPES:
        assert {f.content_type for f in found} == {MEDIA_TYPES[name]}


@pytest.mark.parametrize("name", ENCAPSULATED)
def test_encapsulated_frames_decode_to_pydicoms_pixels(name: str) -> None:
    path = _testfile(name)
    ds = pydicom.dcmread(path)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    if not decoder.is_available:
        pytest.skip(f"no codec installed for {decoder.UID.name}: {decoder.missing_dependencies}")
    for frame, expected in zip(frames(path), _frame_arrays(ds), strict=True):
        np.testing.assert_array_equal(_decode_one(frame, ds), expected)


@pytest.mark.parametrize("table", ["basic", "extended", "none"])
def test_every_fragment_of_a_frame_is_in_its_one_part(tmp_path: Path, table: str) -> None:
    # four JPEG frames, three fragments each; without an offset table pydicom finds each
    # frame's end by the JPEG EOI marker
    source = pydicom.dcmread(_testfile("examples_ybr_color.dcm"))
    payloads = list(generate_frames(source.PixelData, number_of_frames=source.NumberOfFrames))[:4]
    extra: dict[str, tuple[str, Any]] = {}
    if table == "extended":  # one fragment a frame (PS3.3 C.7.6.3.1.8)
        pixel_data, offsets, lengths = encapsulate_extended(payloads)
        extra = {"ExtendedOffsetTable": ("OV", offsets), "ExtendedOffsetTableLengths": ("OV", lengths)}
    else:
        pixel_data = encapsulate(payloads, fragments_per_frame=3, has_bot=table == "basic")
    path = _write(tmp_path / f"{table}.dcm", JPEGBaseline8Bit, pixel_data, rows=source.Rows,
                  columns=source.Columns, number_of_frames=4, bits=8, samples=3, photometric="YBR_FULL_422",
                  vr="OB", encapsulated=True, extra=extra)
    assert [f.data for f in frames(path)] == payloads


@pytest.mark.filterwarnings("ignore:The end of the encapsulated pixel data")
def test_frames_that_cannot_be_told_apart_are_refused(tmp_path: Path) -> None:
    payloads = [bytes([n]) * 1000 for n in range(4)]  # no offset table, no JPEG markers
    pixel_data = encapsulate(payloads, fragments_per_frame=3, has_bot=False)
    path = _write(tmp_path / "lost.dcm", JPEGBaseline8Bit, pixel_data, rows=8, columns=8, number_of_frames=4,
                  bits=8, vr="OB", encapsulated=True)
    with pytest.raises(Unparseable, match="Number of Frames"):
        list(frames(path))


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_multi_frame_compressed_here_decodes_frame_by_frame(tmp_path: Path, syntax: UID) -> None:
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no encoder installed for {syntax.name}: {encoder.missing_dependencies}")
    rng = np.random.default_rng(18)
    values = rng.integers(0, 4096, size=(3, 32, 48), dtype=np.uint16)
    native = _write(tmp_path / "native.dcm", ExplicitVRLittleEndian, values.tobytes(), rows=32, columns=48,
                    number_of_frames=3)
    ds = pydicom.dcmread(native)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    found = list(frames(tmp_path / "compressed.dcm"))
    assert len(found) == 3 and {f.transfer_syntax for f in found} == {str(syntax)}
    for frame, expected in zip(found, values, strict=True):
        np.testing.assert_array_equal(_decode_one(frame, ds), expected)


def test_a_video_is_one_frame_the_whole_stream(tmp_path: Path) -> None:
    stream = bytes(range(256)) * 40
    pixel_data = encapsulate([stream], fragments_per_frame=5, has_bot=False)
    path = _write(tmp_path / "video.dcm", MPEG4HP41, pixel_data, rows=16, columns=16, number_of_frames=120,
                  bits=8, samples=3, photometric="YBR_PARTIAL_420", vr="OB", encapsulated=True)
    assert list(frames(path)) == [Frame(1, stream, "video/mp4", str(MPEG4HP41))]


# -- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["little", "big", "encapsulated"])
def test_frames_are_read_one_at_a_time(tmp_path: Path, kind: str) -> None:
    count, rows, columns = 40, 512, 512  # 20 MiB of frames of 512 KiB
    values = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns)
    if kind == "encapsulated":
        payloads = [values.tobytes() + bytes([n]) for n in range(count)]
        path = _write(tmp_path / "many.dcm", JPEGBaseline8Bit, encapsulate(payloads), rows=rows, columns=columns,
                      number_of_frames=count, bits=8, vr="OB", encapsulated=True)
    else:
        order = "<u2" if kind == "little" else ">u2"
        data = values.astype(order).tobytes() * count
        syntax = ExplicitVRLittleEndian if kind == "little" else ExplicitVRBigEndian
        path = _write(tmp_path / "many.dcm", syntax, data, rows=rows, columns=columns, number_of_frames=count)
    frame_size = rows * columns * 2
    tracemalloc.start()
    try:
        seen = 0
        for frame in frames(path):
            assert len(frame.data) >= frame_size
            seen += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 5 * frame_size, f"peak {peak} bytes for frames of {frame_size}"


# -- multipart ---------------------------------------------------------------------------


def test_a_frame_file_parses_back_to_its_frame() -> None:
    for name in ("MR_small_bigendian.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtdose_rle.dcm"):
        for frame in frames(_testfile(name)):
            boundary = new_boundary()
            body = multipart_frame(frame, boundary)
            assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--\r\n".encode())
            parts = read_parts([body], boundary)
            assert len(parts) == 1
            assert parts[0].body == frame.data
            media, params = content_type_params(parts[0].headers["content-type"])
            assert (media, params["transfer-syntax"]) == (frame.content_type, frame.transfer_syntax)
            media, params = content_type_params(multipart_content_type(frame, boundary))
            assert (media, params["type"], params["boundary"]) == ("multipart/related", frame.content_type, boundary)


def test_boundaries_are_uuid_style_and_never_inside_the_frame() -> None:
    boundary = new_boundary()
    assert boundary.startswith("BOUNDARY_") and len(boundary) == len("BOUNDARY_") + 36
    assert new_boundary() != boundary
    frame = Frame(1, b"abc\r\n--" + boundary.encode() + b"--\r\n", "application/octet-stream", NATIVE_SYNTAX)
    with pytest.raises(ValueError, match="boundary"):
        multipart_frame(frame, boundary)
