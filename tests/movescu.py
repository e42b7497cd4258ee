"""DCMTK ``movescu`` and ``getscu`` as the requesters of C-MOVE and C-GET, and what their
answers mean.

Both run with ``-d``, which prints every response in full: its ``DIMSE Status``, the
four sub-operation counts (``Remaining Suboperations : 3``, or ``none`` when the
response leaves one out) and, after a final response that has a data set, that data
set, whose Failed SOP Instance UID List (0008,0058) is read here. An Error Comment
comes in the status detail, as ``(0000,0902) LO [...]``. ``getscu`` writes the
instances it receives into ``-od``, bit-preserving (``+B``); ``movescu`` has them sent to a move destination
(``-aem``), a ``StoreSCP`` of the test.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peers import dcmtk, dcmtk_env

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings (PS3.4 C.4.2.1.5)
CANCEL = 0xFE00
OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate number of matches
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801

_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
_COUNT = re.compile(r"(Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\S+)")
_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*)\]")
_FAILED_UIDS = re.compile(r"\(0008,0058\) UI \[([^\]]*)\]")
_RESPONSE_TYPE = re.compile(r"Message Type\s*:\s*C-(MOVE|GET) RSP")


@dataclass
class Response:
    status: int
    counts: dict[str, int | None]  # "remaining", "completed", "failed", "warning": None when left out


@dataclass
class RetrieveResult:
    returncode: int
    responses: list[Response]  # every C-MOVE or C-GET response, in order; the last is the final one
    failed_uids: list[str]  # the final response's Failed SOP Instance UID List, if it had one
    error_comment: str | None
    output: str
    seconds: float  # the tool's wall time, start to exit
    files: list[Path] = field(default_factory=list)  # getscu: what it wrote into its output folder

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def final(self) -> int | None:
        return self.responses[-1].status if self.responses and self.responses[-1].status not in PENDING else None

    @property
    def pending(self) -> int:
        return sum(1 for r in self.responses if r.status in PENDING)

    def count(self, kind: str) -> int | None:
        """The final response's number of ``kind`` sub-operations (remaining, completed,
        failed, warning): None when it left the number out."""
        return self.responses[-1].counts[kind] if self.responses else None

    def check(self, status: int = SUCCESS, completed: int | None = None) -> RetrieveResult:
        """Assert that the retrieval ended with ``status`` (and, if given, that many
        sub-operations completed); return self."""
        assert self.final == status, (f"final status {self.final if self.final is None else hex(self.final)} "
                                      f"(comment {self.error_comment!r}), expected {status:#06x}:\n{self.summary()}")
        if completed is not None:
            assert self.count("completed") == completed, f"completed {self.count('completed')}, " \
                f"expected {completed}:\n{self.summary()}"
        return self

    def summary(self) -> str:
        """The lines that say what happened (not the dumps of PDUs and data sets)."""
        words = ("Response", "DIMSE Status", "Suboperations", "Abort", "Association", "(0008,0058)", "(0000,0902)")
        lines = [line for line in self.output.splitlines()
                 if line.startswith(("E:", "W:", "F:")) or any(word in line for word in words)]
        return "\n".join(lines[-60:])


def _parse(output: str) -> tuple[list[Response], list[str], str | None]:
    """The C-MOVE/C-GET responses in ``-d`` output. C-STORE responses (getscu's own, to
    the sub-operations) are printed in the same format: only C-MOVE RSP and C-GET RSP
    messages count."""
    responses: list[Response] = []
    blocks = re.split(r"=+ (?:INCOMING|OUTGOING) DIMSE MESSAGE =+", output)
    for block in blocks[1:]:
        message = block.split("END DIMSE MESSAGE", 1)[0]
        if not _RESPONSE_TYPE.search(message):
            continue
        status = _STATUS.search(message)
        if status is None:
            continue
        counts: dict[str, int | None] = {k: None for k in ("remaining", "completed", "failed", "warning")}
        for kind, value in _COUNT.findall(message):
            counts[kind.lower()] = int(value) if value.isdigit() else None
        responses.append(Response(int(status.group(1), 16), counts))
    # the final response's data set and status detail follow its message
    tail = blocks[-1] if len(blocks) > 1 else output
    failed = _FAILED_UIDS.findall(tail)
    uids = [u for u in failed[-1].split("\\") if u] if failed else []
    comments = _COMMENT.findall(output)
    return responses, uids, comments[-1] if comments else None


def _keys(level: str, keys: Sequence[str]) -> list[str]:
    args = ["-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    return args


def _root(root: str) -> str:
    return {"study": "-S", "patient": "-P"}[root]


def movescu(port: int, level: str, keys: Sequence[str], destination: str, root: str = "study",
            calling_ae: str = "MOVESCU", called_ae: str = "ANY-SCP", extra: Sequence[str] = (),
            timeout: float = 120) -> RetrieveResult:
    """One C-MOVE from DCMTK's movescu: ``root`` ``"study"`` (-S) or ``"patient"`` (-P);
    ``keys`` as movescu's ``-k`` takes them (``StudyInstanceUID=1.2.3``, a list of UIDs
    joined by backslashes); the instances go to the AE title ``destination``."""
    args = ["-d", _root(root), "-aet", calling_ae, "-aec", called_ae, "-aem", destination, *_keys(level, keys),
            *extra, "127.0.0.1", str(port)]
    started = time.monotonic()
    proc = subprocess.run([dcmtk("movescu"), *args], env=dcmtk_env(), capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    responses, uids, comment = _parse(output)
    return RetrieveResult(proc.returncode, responses, uids, comment, output, seconds)


def getscu(port: int, level: str, keys: Sequence[str], out: Path, root: str = "study",
           calling_ae: str = "GETSCU", called_ae: str = "ANY-SCP", extra: Sequence[str] = (),
           timeout: float = 120) -> RetrieveResult:
    """One C-GET from DCMTK's getscu, the instances written into ``out`` (created if
    need be). getscu proposes its storage SOP classes (SCP role) with the uncompressed
    syntaxes, and one compressed syntax more with a ``--prefer-...`` option in
    ``extra`` (``+xr``: RLE, ``+xv``: JPEG 2000 lossless, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    # +B: each data set written as it came off the wire (getscu re-encodes it otherwise)
    args = ["-d", "+B", _root(root), "-aet", calling_ae, "-aec", called_ae, "-od", str(out), *_keys(level, keys),
            *extra, "127.0.0.1", str(port)]
    started = time.monotonic()
    proc = subprocess.run([dcmtk("getscu"), *args], env=dcmtk_env(), capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    responses, uids, comment = _parse(output)
    files = sorted(p for p in out.iterdir() if p.is_file() and p not in before)
    return RetrieveResult(proc.returncode, responses, uids, comment, output, seconds, files)
