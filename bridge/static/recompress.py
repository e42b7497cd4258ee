"""Optional recompression of frames on their way into a static tree, to a lossless syntax
(as OHIF's converters offer with ``--recompress``), with pydicom's encoders.

``TARGETS`` names the syntaxes: ``jpeg-ls`` (JPEG-LS Lossless, pyjpegls), ``rle`` (RLE
Lossless, pydicom's own encoder) and ``jpeg2000-lossless`` (JPEG 2000 Lossless Only,
pylibjpeg-openjpeg). Which instances are recompressed:

- native Pixel Data (every uncompressed syntax): each frame, as ``frames.frames`` cuts it
  (little endian), becomes an array and is encoded;
- JPEG 2000 Lossless Only, and JPEG 2000 whose Lossy Image Compression (0028,2110) is
  ``00``: each frame is decoded, then encoded. JPEG 2000 without that ``00`` may be lossy,
  and lossy sources (JPEG baseline and extended, JPEG-LS near-lossless, lossy JPEG 2000)
  are never recompressed: a lossless copy of lossy values is only bigger. Other lossless
  syntaxes (JPEG lossless, RLE, JPEG-LS), video, and an instance already in the target
  syntax are kept as they are, silently: that is the choice, not a failure.

Encoding goes through an array, so pydicom checks every value against Bits Stored and
Pixel Representation: a frame with values outside them (bits above Bits Stored set,
signed values not sign-extended) is refused rather than encoded with those bits lost.
What the encoder cannot take (1-bit, Float and Double Float Pixel Data, Bits Allocated
other than 8 or 16 for JPEG-LS and RLE, YBR_FULL_422, a codec not installed, PS3.5 8.2's
table for the syntax) leaves the instance as it is, with a warning (``Plan.warning``);
an error from the encoder in any frame does the same for the whole instance.

A recompressed instance's metadata changes only where the new encoding requires:
AvailableTransferSyntaxUID (0008,3002) is the new syntax, Planar Configuration
(0028,0006) is 0 (PS3.5 8.2.2, 8.2.3, 8.2.4: the codestream orders the samples), and a
JPEG 2000 source's YBR_RCT or YBR_ICT Photometric Interpretation becomes RGB (the
decoder undoes the component transform). Lossy Image Compression is untouched: nothing
here loses a value.

Memory: one frame at a time, as ``frames.frames`` reads it, plus its array and its
encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from bridge.config.destinations import RECOMPRESS_SYNTAXES
from bridge.static import frames as framing

TARGETS: dict[str, UID] = {"jpeg-ls": JPEGLSLossless, "rle": RLELossless, "jpeg2000-lossless": JPEG2000Lossless}
"""The syntaxes frames may be recompressed to, by the name the config and CLI use."""
assert set(TARGETS) == set(RECOMPRESS_SYNTAXES), "bridge.config.destinations.Recompress names other syntaxes"

Encode = Callable[[framing.Frame], framing.Frame]
_FROM_J2K = {"YBR_RCT": "RGB", "YBR_ICT": "RGB"}
_DTYPES = {8: "u1", 16: "u2", 32: "u4"}


class RecompressError(Exception):
    """A frame the encoder (or, for JPEG 2000, the decoder) could not take."""


@dataclass(frozen=True)
class Plan:
    """What to do with one instance's frames: ``encode`` each (when set), or keep them as
    they are, with ``warning`` saying why when that is not the choice but a limit."""

    encode: Encode | None = None
    transfer_syntax: str = ""
    changes: tuple[tuple[str, Any], ...] = ()
    warning: str = ""


KEEP = Plan()


class Recompressor:
    """Recompression to ``TARGETS[name]``; ``plan`` decides per instance."""

    def __init__(self, name: str) -> None:
        if name not in TARGETS:
            raise ValueError(f"unknown recompression {name!r}: one of {', '.join(TARGETS)}")
        self.name = name
        self.target = TARGETS[name]
        self.encoder = get_encoder(self.target)
        self.media_type = framing.MEDIA_TYPES[str(self.target)]

    def plan(self, ds: Dataset, syntax: str) -> Plan:
        """The plan for the instance ``ds`` (read with its pixel data deferred) in ``syntax``."""
        uid = UID(syntax)
        if "PixelData" not in ds:
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                return Plan(warning="float pixel data cannot be recompressed: written as it is")
            return KEEP
        if uid == self.target:
            return KEEP
        if uid.is_encapsulated:
            lossless_j2k = uid == JPEG2000Lossless or (uid == JPEG2000 and ds.get("LossyImageCompression") == "00")
            if not lossless_j2k:
                return KEEP
        try:
            options = _options(ds, uid)
        except (AttributeError, TypeError, ValueError) as exc:
            return Plan(warning=f"not recompressed, the image pixel description is incomplete: {exc}")
        photometric = options["photometric_interpretation"]
        if uid.is_encapsulated:
            photometric = _FROM_J2K.get(photometric, photometric)
            decoder = get_decoder(uid)
            if not decoder.is_available:
                return Plan(warning=f"not recompressed: no installed codec decodes {uid.name} "
                                    f"(missing: {', '.join(decoder.missing_dependencies)})")
        if not self.encoder.is_available:
            return Plan(warning=f"not recompressed: no installed codec encodes {self.target.name} "
                                f"(missing: {', '.join(self.encoder.missing_dependencies)})")
        if reason := self._refusal(options, photometric):
            return Plan(warning=f"not recompressed to {self.target.name}: {reason}; written as it is")
        target = {k: v for k, v in options.items() if k != "transfer_syntax_uid"}
        target.update(photometric_interpretation=photometric, planar_configuration=0)
        changes: list[tuple[str, Any]] = []
        if photometric != options["photometric_interpretation"]:
            changes.append(("PhotometricInterpretation", photometric))
        if "PlanarConfiguration" in ds and options["samples_per_pixel"] > 1:
            changes.append(("PlanarConfiguration", 0))
        encode = self._from_native(options, target) if not uid.is_encapsulated else self._from_j2k(uid, options, target)
        return Plan(encode, str(self.target), tuple(changes))

    def _refusal(self, options: dict[str, Any], photometric: str) -> str:
        bits, stored = options["bits_allocated"], options["bits_stored"]
        samples, signed = options["samples_per_pixel"], options["pixel_representation"]
        if bits not in _DTYPES:
            return f"Bits Allocated {bits}"
        for pi, spp, px_repr, bits_a, bits_s in ENCODING_PROFILES.get(self.target, []):
            if (pi, spp) == (photometric, samples) and signed in px_repr and bits in bits_a and stored in bits_s:
                return ""
        return (f"{samples} samples of {stored} of {bits} bits, {'signed' if signed else 'unsigned'}, "
                f"{photometric}, is not in PS3.5's table for it")

    def _from_native(self, options: dict[str, Any], target: dict[str, Any]) -> Encode:
        rows, columns, samples = options["rows"], options["columns"], options["samples_per_pixel"]
        dtype = np.dtype(("<i" if options["pixel_representation"] else "<u") + _DTYPES[options["bits_allocated"]][1:])
        planar = samples > 1 and options.get("planar_configuration") == 1

        def encode(frame: framing.Frame) -> framing.Frame:
            values = np.frombuffer(frame.data, dtype=dtype)
            array: np.ndarray
            if samples == 1:
                array = values.reshape(rows, columns)
            elif planar:
                array = values.reshape(samples, rows, columns).transpose(1, 2, 0)
            else:
                array = values.reshape(rows, columns, samples)
            return self._encoded(frame, array, target)

        return encode

    def _from_j2k(self, syntax: UID, options: dict[str, Any], target: dict[str, Any]) -> Encode:
        decoder = get_decoder(syntax)

        def encode(frame: framing.Frame) -> framing.Frame:
            try:
                array, _ = decoder.as_array(encapsulate([frame.data]), index=0, **{**options, "as_rgb": False})
            except Exception as exc:
                raise RecompressError(f"frame {frame.number} cannot be decoded: {exc}") from exc
            return self._encoded(frame, array, target)

        return encode

    def _encoded(self, frame: framing.Frame, array: np.ndarray, target: dict[str, Any]) -> framing.Frame:
        try:
            data = self.encoder.encode(array, **target)
        except Exception as exc:
            raise RecompressError(f"frame {frame.number} cannot be encoded: {_first_line(exc)}") from exc
        return framing.Frame(frame.number, bytes(data), self.media_type, str(self.target))


def _options(ds: Dataset, syntax: UID) -> dict[str, Any]:
    """The image pixel description of one frame, as pydicom's coders take it."""
    options: dict[str, Any] = {
        "transfer_syntax_uid": syntax,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": int(ds.SamplesPerPixel),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric_interpretation": str(ds.PhotometricInterpretation),
        "number_of_frames": 1,
    }
    if options["samples_per_pixel"] > 1:
        options["planar_configuration"] = int(ds.get("PlanarConfiguration", 0) or 0)
    return options


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
