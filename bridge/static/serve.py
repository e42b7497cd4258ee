"""The read-only DICOMweb routes of a static tree, as an ASGI app (``app(root)``).

``root`` is the folder that holds ``studies/`` (docs/static.md has the layout). Each
route maps onto the tree's files (no other file is reachable: not the writer's
``.lock``, ``.source.sha256`` or temporary files):

| route | file |
| --- | --- |
| ``/studies`` | ``studies/index.json.gz`` (``studies/S/index.json.gz`` for ``StudyInstanceUID=S``) |
| ``/studies/S/series`` | ``studies/S/series/index.json.gz`` |
| ``/studies/S/series/X/instances`` | ``.../X/instances/index.json.gz`` |
| ``/studies/S/metadata`` | every series' ``metadata.gz``, joined, URIs made relative to the study |
| ``/studies/S/series/X/metadata`` | ``.../X/metadata.gz`` |
| ``/studies/S/series/X/instances/I/metadata`` | ``.../I/metadata.gz`` |
| ``/.../I/frames/N`` | ``.../I/frames/N.mht`` or ``N.mht.gz`` |
| ``/.../I/frames/N,M,...`` | those files' parts in one multipart body, with a new boundary |
| ``/studies/S/bulkdata/aa/bb/REST`` | ``studies/S/bulkdata/aa/bb/REST.mht.gz`` |

A stored ``.gz`` goes out as it is with ``Content-Encoding: gzip`` when the request's
Accept-Encoding allows gzip, decompressed as it is sent otherwise. A search without
filters, ``limit`` or ``offset`` is its query file as it is; one with them is the query
objects that match (``bridge.static.qido``). JSON is ``application/dicom+json``; a frame
or bulk data file is ``multipart/related; type="<its part's type>"; boundary=<its
boundary>``, both read from the file's head.

Failures: a malformed UID, frame list or bulk data path, a dot segment (``..``) in the
path, or a bad search parameter answer 400; what the tree lacks, 404; both with a JSON
``{"message": ...}``. Anything else (a broken file in the tree, a bug) answers 500 with
``{"message": ..., "id": ...}`` and is logged with its traceback under that id (``_Guard``,
the one place that turns an exception into a status). Paths are built only from
validated UIDs, digits and hex, so no request reaches a file outside ``root``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
import re
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.asgi import guarded, printable
from bridge.dataset.uids import is_valid_uid
from bridge.static import qido
from bridge.static.metadata import Level, dumps

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
CHUNK = 256 * 1024
HEAD = 4096  # a frame file's boundary line and part headers fit in this
COMPRESS_OVER = 1400  # a computed answer smaller than this goes out uncompressed

_FRAMES = re.compile(r"[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX_REST = re.compile(r"[0-9a-f]{1,64}")


def app(root: Path) -> Starlette:
    """The ASGI app serving the static tree under ``root`` (the folder holding ``studies/``)."""
    tree = _Tree(Path(root))
    series = "/studies/{study}/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", tree.studies),
        Route("/studies/{study}/series", tree.series),
        Route("/studies/{study}/metadata", tree.study_metadata),
        Route(series + "/instances", tree.instances),
        Route(series + "/metadata", tree.series_metadata),
        Route(instance + "/metadata", tree.instance_metadata),
        Route(instance + "/frames/{frames}", tree.frames),
        Route("/studies/{study}/bulkdata/{aa}/{bb}/{rest}", tree.bulkdata),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Guard)],
                     exception_handlers={HTTPException: _http_error})


class _Tree:
    def __init__(self, root: Path) -> None:
        self.studies_dir = root / "studies"

    # -- searches ------------------------------------------------------------------------

    def studies(self, request: Request) -> Response:
        search = _search(request, "STUDY")
        wanted = request.query_params.getlist("StudyInstanceUID")
        if not (self.studies_dir / "index.json.gz").is_file():
            return _json(request, [])  # no study yet
        if not search.filters:
            return _warned(_stored(request, self.studies_dir / "index.json.gz", DICOM_JSON), search)
        if len(wanted) == 1 and is_valid_uid(wanted[0]):
            # One study: its own small file, not the whole list.
            objects = _load_optional(self.studies_dir / wanted[0] / "index.json.gz")
        else:
            objects = _load_optional(self.studies_dir / "index.json.gz")
        return _answer(request, search, objects)

    def series(self, request: Request) -> Response:
        search = _search(request, "SERIES")
        path = self._study(request) / "series" / "index.json.gz"
        if not search.filters:
            return _warned(_stored(request, path, DICOM_JSON), search)
        return _answer(request, search, _load(path))

    def instances(self, request: Request) -> Response:
        search = _search(request, "INSTANCE")
        path = self._series(request) / "instances" / "index.json.gz"
        if not search.filters:
            return _warned(_stored(request, path, DICOM_JSON), search)
        return _answer(request, search, _load(path))

    # -- metadata ------------------------------------------------------------------------

    def series_metadata(self, request: Request) -> Response:
        return _stored(request, self._series(request) / "metadata.gz", DICOM_JSON)

    def instance_metadata(self, request: Request) -> Response:
        return _stored(request, self._instance(request) / "metadata.gz", DICOM_JSON)

    def study_metadata(self, request: Request) -> Response:
        study = self._study(request)
        uids = [_first(o, "0020000E") for o in _load(study / "series" / "index.json.gz")]
        paths = [(uid, study / "series" / uid / "metadata.gz") for uid in uids if is_valid_uid(uid)]
        return StreamingResponse(_study_metadata(paths), media_type=DICOM_JSON)

    # -- frames and bulk data ------------------------------------------------------------

    def frames(self, request: Request) -> Response:
        instance = self._instance(request)
        listed = request.path_params["frames"]
        if not _FRAMES.fullmatch(listed):
            raise HTTPException(400, f"frames must be a comma-separated list of frame numbers from 1, "
                                     f"not {listed!r}")
        numbers = [int(n) for n in listed.split(",")]
        paths = []
        for number in numbers:
            path = _frame_file(instance / "frames", number)
            if path is None:
                raise HTTPException(404, f"frame {number} not found")
            paths.append(path)
        if len(paths) == 1:
            return _multipart(request, paths[0])
        boundary, part_type = _frame_head(paths[0])
        new = f"BOUNDARY_{uuid.uuid4()}"
        return StreamingResponse(_reboundaried(paths, new),
                                 media_type=f'multipart/related; type="{part_type}"; boundary={new}')

    def bulkdata(self, request: Request) -> Response:
        study = self._study(request)
        aa, bb, rest = (request.path_params[k] for k in ("aa", "bb", "rest"))
        if not (_HEX2.fullmatch(aa) and _HEX2.fullmatch(bb) and _HEX_REST.fullmatch(rest)):
            raise HTTPException(400, "a bulk data path is bulkdata/aa/bb/rest in lowercase hex digits")
        path = study / "bulkdata" / aa / bb / f"{rest}.mht.gz"
        if not path.is_file():
            raise HTTPException(404, "bulk data not found")
        return _multipart(request, path)

    # -- resources -----------------------------------------------------------------------

    def _study(self, request: Request) -> Path:
        uid = _uid(request.path_params["study"], "study")
        path = self.studies_dir / uid
        if not path.is_dir():
            raise HTTPException(404, f"study {uid} not found")
        return path

    def _series(self, request: Request) -> Path:
        study = self._study(request)
        uid = _uid(request.path_params["series"], "series")
        path = study / "series" / uid
        if not path.is_dir():
            raise HTTPException(404, f"series {uid} not found in study {study.name}")
        return path

    def _instance(self, request: Request) -> Path:
        series = self._series(request)
        uid = _uid(request.path_params["instance"], "instance")
        path = series / "instances" / uid
        if not path.is_dir():
            raise HTTPException(404, f"instance {uid} not found in series {series.name}")
        return path


# -- requests ------------------------------------------------------------------------------

def _uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise HTTPException(400, f"{what} UID {value!r} is not a valid UID")
    return value


def _search(request: Request, level: Level) -> qido.Search:
    try:
        return qido.parse(request.query_params.multi_items(), level)
    except qido.BadQuery as exc:
        raise HTTPException(400, str(exc)) from None


def accepts_gzip(request: Request) -> bool:
    """RFC 9110 12.5.3: gzip (or ``*``) listed with a non-zero weight, gzip's own weight
    deciding when both are."""
    weights: dict[str, float] = {}
    for item in request.headers.get("accept-encoding", "").split(","):
        name, *params = (p.strip() for p in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[name.lower()] = weight
    weight = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    return weight > 0


# -- responses -----------------------------------------------------------------------------

def _stored(request: Request, path: Path, media_type: str) -> Response:
    """A stored ``.gz`` file as it is (Content-Encoding: gzip) or decompressed as it is sent."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise HTTPException(404, "not found") from None
    headers = {"Vary": "Accept-Encoding"}
    if accepts_gzip(request):
        headers |= {"Content-Encoding": "gzip", "Content-Length": str(os.fstat(f.fileno()).st_size)}
        return StreamingResponse(_chunks(f), media_type=media_type, headers=headers)
    return StreamingResponse(_gunzip(f), media_type=media_type, headers=headers)


def _answer(request: Request, search: qido.Search, objects: list[Any]) -> Response:
    return _warned(_json(request, search.apply(objects)), search)


def _warned(response: Response, search: qido.Search) -> Response:
    """PS3.18 8.3.4.3: query keys that were not used are named in a Warning header."""
    if search.ignored:
        names = ", ".join(search.ignored)
        response.headers["Warning"] = f'299 dicom-bridge "The following query keys are not supported: {names}"'
    return response


def _json(request: Request, obj: Any) -> Response:
    body = dumps(obj)
    headers = {"Vary": "Accept-Encoding"}
    if len(body) > COMPRESS_OVER and accepts_gzip(request):
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=DICOM_JSON, headers=headers)


def _multipart(request: Request, path: Path) -> Response:
    """A one-part multipart file (a frame, a bulk data value), its Content-Type from its head."""
    boundary, part_type = _frame_head(path)
    media_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if path.suffix == ".gz":
        return _stored(request, path, media_type)
    f = path.open("rb")
    headers = {"Content-Length": str(os.fstat(f.fileno()).st_size)}
    return StreamingResponse(_chunks(f), media_type=media_type, headers=headers)


def _frame_file(folder: Path, number: int) -> Path | None:
    for name in (f"{number}.mht", f"{number}.mht.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _open(path: Path) -> IO[bytes]:
    return cast(IO[bytes], gzip.open(path, "rb")) if path.suffix == ".gz" else path.open("rb")


def _frame_head(path: Path) -> tuple[str, str]:
    """The boundary of a one-part multipart file (its first line) and its part's media type."""
    with _open(path) as f:
        head = f.read(HEAD)
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if not lines[0].startswith(b"--") or len(lines[0]) < 3:
        raise ValueError(f"{path} does not begin with a multipart boundary")
    boundary = lines[0][2:].decode("ascii")
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-type":
            return boundary, value.split(";")[0].strip()
    raise ValueError(f"{path}'s part has no Content-Type")


def _part(path: Path) -> tuple[bytes, bytes]:
    """A one-part multipart file's part headers and content; its end is found by searching
    for the closing delimiter, not by offsets."""
    with _open(path) as f:
        data = f.read()
    first, _, rest = data.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    end = body.rfind(b"\r\n" + first + b"--")
    if not first.startswith(b"--") or end < 0:
        raise ValueError(f"{path} is not a one-part multipart body")
    return headers, body[:end]


def _reboundaried(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """The parts of several one-part files in one body. The new boundary is a fresh uuid4,
    which no frame holds by chance (the writer's own boundaries are made the same way)."""
    for path in paths:
        headers, body = _part(path)
        yield b"".join([f"--{boundary}\r\n".encode("ascii"), headers, b"\r\n\r\n", body, b"\r\n"])
    yield f"--{boundary}--\r\n".encode("ascii")


def _study_metadata(paths: list[tuple[str, Path]]) -> Iterator[bytes]:
    """Every series' metadata in one array, one series in memory at a time, relative URIs
    rewritten to resolve from ``/studies/S/metadata`` as they did from the series'."""
    yield b"["
    first = True
    for uid, path in paths:
        if not path.is_file():
            continue  # a series listed before its metadata was written: it has no instance yet
        for instance in _load(path):
            _rebase(instance, f"series/{uid}/")
            yield (b"" if first else b",") + dumps(instance)
            first = False
    yield b"]"


def _rebase(obj: dict[str, Any], prefix: str) -> None:
    for attr in obj.values():
        uri = attr.get("BulkDataURI")
        if isinstance(uri, str) and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|/", uri):
            attr["BulkDataURI"] = "./" + posixpath.normpath(prefix + uri)
        for item in attr.get("Value", ()) if attr.get("vr") == "SQ" else ():
            if isinstance(item, dict):
                _rebase(item, prefix)


def _load(path: Path) -> list[Any]:
    try:
        with gzip.open(path, "rb") as f:
            objects = json.load(f)
    except FileNotFoundError:
        raise HTTPException(404, "not found") from None
    if not isinstance(objects, list):
        raise ValueError(f"{path} does not hold a JSON array")
    return objects


def _load_optional(path: Path) -> list[Any]:
    return _load(path) if path.is_file() else []


def _first(obj: dict[str, Any], key: str) -> str:
    values = obj.get(key, {}).get("Value") or [""]
    return str(values[0])


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


def _gunzip(f: IO[bytes]) -> Iterator[bytes]:
    inflate = zlib.decompressobj(wbits=31)
    with f:
        while chunk := f.read(CHUNK):
            yield inflate.decompress(chunk)
            while inflate.eof and inflate.unused_data:  # concatenated gzip members
                rest = inflate.unused_data
                inflate = zlib.decompressobj(wbits=31)
                yield inflate.decompress(rest)
        yield inflate.flush()


# -- failures ------------------------------------------------------------------------------

async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"message": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class _Guard:
    """The outermost layer: dot segments answer 400 before routing; an exception answers
    500 with a correlation id and is logged with its traceback (never sent)."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        raw = scope.get("raw_path") or b""
        segments = scope["path"].split("/") + raw.decode("latin-1").split("?")[0].split("/")
        if any(s in (".", "..") or s.lower() in ("%2e", "%2e%2e", ".%2e", "%2e.") for s in segments):
            await JSONResponse({"message": "a path may not hold . or .. segments"}, 400)(scope, receive, send)
            return
        await guarded(self.inner, scope, receive, send, _failed)


def _failed(scope: Scope, exc: Exception) -> Response:
    ident = uuid.uuid4().hex[:12]
    LOGGER.error("%s %s failed (id %s)", scope.get("method"), printable(scope["path"]), ident, exc_info=exc)
    return JSONResponse({"message": "internal error; the server's log has the details", "id": ident}, 500)
