"""Transfer syntax conversion for peers that refuse an instance's own syntax (PS3.5 10, A).

Only conversions that keep every value are made, and only to the two syntaxes every
Storage SCP accepts, explicit and implicit VR little endian:

- encapsulated (compressed) Pixel Data is decoded with the installed pixel decoders
  (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls, pydicom's own RLE). A lossy syntax
  is decoded too: the values are those any receiver would display, and Lossy Image
  Compression (0028,2110) stays, or becomes, ``01``;
- deflated explicit VR little endian is inflated;
- explicit VR big endian becomes little endian with the values of OW, OF, OL, OD and OV
  elements byte-swapped (pydicom does not swap them itself, and relabelling the syntax
  without swapping would corrupt every 16-bit image); a value of unknown VR (UN) cannot
  be swapped exactly, so such a data set is refused;
- explicit and implicit VR little endian into each other (implicit to explicit takes
  VRs from the data dictionary; private elements without one become UN).

Everything else raises ``NotConvertible`` with the reason. A conversion reads the whole
data set into memory; the unconverted path never does (see ``bridge.destinations.dimse``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bridge.errors import BridgeError

LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# PS3.5 7.3: the byte order of these VRs' values follows the transfer syntax, in units of
# this many bytes. pydicom keeps them as bytes and writes them as they were read.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


class NotConvertible(BridgeError):
    """The instance cannot be re-encoded in the syntax the peer accepts without changing it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def name(uid: str) -> str:
    """``JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)``, or the bare UID when unknown."""
    known = UID(uid).name
    return f"{known} ({uid})" if known != uid else uid


def problem(source: str, target: str) -> str | None:
    """Why ``source`` cannot be converted to ``target`` exactly, or None if it can be tried
    (decided from the UIDs alone, before anything is read)."""
    if source == target:
        return None
    if target not in LITTLE_ENDIAN:
        return f"conversions are made only to uncompressed little endian, not to {name(target)}"
    uid = UID(source)
    if not uid.is_transfer_syntax:
        return f"{name(source)} is not a transfer syntax this bridge knows"
    if uid.is_encapsulated:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            return f"no pixel decoder exists for {name(source)}"
        if not decoder.is_available:
            return f"no installed codec decodes {name(source)} (missing: {', '.join(decoder.missing_dependencies)})"
    return None


def convert(source: Path, target: Path, target_syntax: str) -> None:
    """Write the Part-10 file ``source`` to ``target`` in ``target_syntax``, exactly (see the
    module docstring); raises ``NotConvertible`` when that cannot be done."""
    if reason := problem(_syntax_of(source), target_syntax):
        raise NotConvertible(reason)
    try:
        ds = pydicom.dcmread(source)
    except Exception as exc:
        raise NotConvertible(f"cannot read the data set: {type(exc).__name__}: {exc}") from exc
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax.is_encapsulated and "PixelData" in ds:
        _decompress(ds, syntax)
    elif syntax == ExplicitVRBigEndian:
        swap_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = UID(target_syntax)
    try:
        # dcmwrite, not save_as: save_as refuses to change endianness (we swapped ourselves).
        pydicom.dcmwrite(target, ds, enforce_file_format=True)
    except Exception as exc:
        raise NotConvertible(f"cannot encode the data set in {name(target_syntax)}: {exc}") from exc


def swap_to_little_endian(ds: Dataset) -> None:
    """Byte-swap, in place, the values whose order the transfer syntax sets (OW, OF, OL, OD,
    OV), in every nested sequence item. Pixel Data of 32 or 64 bits allocated holds values of
    that width even as OW (PS3.5 8.1.1). Raises ``NotConvertible`` on a UN value."""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    for elem in ds.iterall():
        if elem.VR == "UN" and elem.value:
            raise NotConvertible(f"big endian data set holds {elem.tag} with unknown VR (UN): its value "
                                 "cannot be byte-swapped exactly")
        width = _SWAP_WIDTH.get(str(elem.VR))
        if width is None or not elem.value or isinstance(elem.value, list):
            continue
        if elem.tag == _PIXEL_DATA and elem.VR == "OW" and bits in (32, 64):
            width = bits // 8
        data = bytes(elem.value)
        usable = len(data) - len(data) % width
        swapped = np.frombuffer(data[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes()
        elem.value = swapped + data[usable:]


def _decompress(ds: Dataset, syntax: UID) -> None:
    if int(ds.get("BitsAllocated", 0) or 0) == 1:
        raise NotConvertible(f"1-bit Pixel Data in {name(syntax)} cannot be decoded exactly here")
    try:
        # The SOP Instance UID stays: a change of transfer syntax is not a new instance.
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise NotConvertible(f"the installed codecs cannot decode this {name(syntax)} Pixel Data: "
                             f"{_one_line(exc)}") from exc


def _syntax_of(path: Path) -> str:
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
        return str(meta.TransferSyntaxUID)
    except Exception as exc:
        raise NotConvertible(f"cannot read the file meta information: {exc}") from exc


def _one_line(exc: Exception) -> str:
    """pydicom says why each decoder plugin failed, one per line: keep them all, on one line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join([*lines[:1], "; ".join(lines[1:])]).strip()
    return (text[:400] + "...") if len(text) > 400 else text or type(exc).__name__
