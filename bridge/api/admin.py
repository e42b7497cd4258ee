"""The admin API under ``/api`` (bearer token): the queue, dead letters, destinations,
reload. (Being built: see docs/api.md.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from bridge.api.deps import caller

router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(caller)])
