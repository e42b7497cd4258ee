"""DCMTK ``findscu`` as the requester of C-FIND, and what its answers mean.

``findscu -d`` prints every C-FIND response's status (``DIMSE Status : 0xff00``) and
the final one's Error Comment; ``-X`` writes each pending response's identifier to a
file (``rsp0001.dcm``, ...), read back here with pydicom and decoded by its own
Specific Character Set. Tests compare decoded strings, never bytes: Orthanc and the
bridge may encode the same name differently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from peers import dcmtk, dcmtk_env
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

PENDING = (0xFF00, 0xFF01)
UTF8 = "SpecificCharacterSet=ISO_IR 192"
SUCCESS = 0x0000
CANCEL = 0xFE00

# The level's unique key (PS3.4 C.3): what a match is known by.
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}

# What a response may carry besides the keys asked for (PS3.4 C.4.1.1.3.2).
ALWAYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}

_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*)\]")


@dataclass
class FindResult:
    returncode: int
    statuses: list[int]  # every C-FIND response's status, in order; the last is the final one
    responses: list[Dataset]  # each pending response's identifier, decoded
    error_comment: str | None
    output: str
    seconds: float  # findscu's wall time, start to exit

    @property
    def final(self) -> int | None:
        return self.statuses[-1] if self.statuses and self.statuses[-1] not in PENDING else None

    def check(self, status: int = SUCCESS) -> FindResult:
        """Assert that the C-FIND ended with ``status``; return self."""
        assert self.final == status, (f"final status {self.final and hex(self.final)} "
                                      f"(comment {self.error_comment!r}), expected {status:#06x}:\n{self.summary()}")
        return self

    def summary(self) -> str:
        """findscu's lines that say what happened (not its dumps of PDUs and data sets)."""
        lines = [line for line in self.output.splitlines() if line.startswith(("E:", "W:", "F:"))
                 or any(word in line for word in ("Response", "DIMSE Status", "Abort", "Association"))]
        return "\n".join(lines[-40:])


def findscu(port: int, level: str, keys: Sequence[str], root: str = "study", calling_ae: str = "FINDSCU",
            called_ae: str = "ANY-SCP", extra: Sequence[str] = (), timeout: float = 60) -> FindResult:
    """One C-FIND from DCMTK's findscu: ``root`` ``"study"`` (-S) or ``"patient"`` (-P),
    ``keys`` as findscu's ``-k`` takes them (``PatientName=A*``, or ``PatientID`` alone
    for a return key). findscu sends the command line's bytes as they are: a key with a
    non-ASCII value needs its Specific Character Set among ``keys`` (``UTF8`` for text
    given as it is; other sets as ``os.fsdecode`` of the encoded bytes)."""
    args = ["-d", "-S" if root == "study" else "-P", "-aet", calling_ae, "-aec", called_ae,
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    out = Path(tempfile.mkdtemp(prefix="findscu-"))
    try:
        started = time.monotonic()
        # errors="replace": findscu echoes the identifier's bytes, which need not be UTF-8
        proc = subprocess.run([dcmtk("findscu"), *args, "-X", "-od", str(out), *extra, "127.0.0.1", str(port)],
                              env=dcmtk_env(), capture_output=True, text=True, errors="replace", timeout=timeout)
        seconds = time.monotonic() - started
        output = proc.stdout + proc.stderr
        responses: list[Dataset] = []
        for path in sorted(out.glob("rsp*.dcm")):
            ds = pydicom.dcmread(path)
            ds.decode()
            responses.append(ds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    statuses = [int(m.group(1), 16) for m in _STATUS.finditer(output)]
    comments = _COMMENT.findall(output)
    return FindResult(proc.returncode, statuses, responses, comments[-1] if comments else None, output, seconds)


def text(ds: Dataset, keyword: str) -> str | tuple[str, ...]:
    """A response's value of ``keyword`` as decoded text, for comparing answers: '' when
    absent or empty; a multi-valued one as the sorted tuple of its values (the order of
    ModalitiesInStudy's values is the source's, not a meaning)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        values = sorted(str(v).strip() for v in value)
        return tuple(values) if len(values) > 1 else values[0]
    if isinstance(value, float | int):
        return format(value, "g")
    return str(value).strip()


def keywords(keys: Iterable[str]) -> list[str]:
    """The attribute keywords of findscu ``-k`` arguments, without the request's own
    (SpecificCharacterSet, QueryRetrieveLevel)."""
    names = [k.partition("=")[0] for k in keys]
    return [n for n in names if n not in ("SpecificCharacterSet", "QueryRetrieveLevel")]


def matches(result: FindResult, level: str, keys: Iterable[str]) -> set[tuple[tuple[str, object], ...]]:
    """The answer as a set of matches: for each response, its level's unique key and the
    decoded values of the keys asked for."""
    names = sorted({UNIQUE[level], *keywords(keys)})
    return {tuple((n, text(ds, n)) for n in names) for ds in result.responses}


def unique_values(result: FindResult, level: str) -> list[str]:
    return [str(ds.get(UNIQUE[level], "")) for ds in result.responses]
