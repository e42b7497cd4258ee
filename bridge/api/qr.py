"""The JSON query and retrieve API under ``/api`` (bearer token). (Being built: see docs/api.md.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from bridge.api.deps import caller

router = APIRouter(prefix="/api", tags=["query and retrieve"], dependencies=[Depends(caller)])
