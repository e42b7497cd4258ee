"""The admin API's query parameters, bodies and answers (``bridge.api.admin``), as
pydantic models: FastAPI validates with them (a failure answers 400 naming the field)
and describes them in the OpenAPI document. The filters are those of ``dicom-bridge
queue`` (docs/operations.md), under the same names without the dashes."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from bridge.config.units import parse_duration
from bridge.forward.queue import STATES, RowFilter

MAX_ROWS = 10_000  # rows a listing shows, and ids a retry or purge names, at most
MAX_ID = 2**63 - 1  # SQLite's largest integer


def _text(value: str) -> str:
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise ValueError("control characters and unpaired surrogates are not allowed")
    return value


def _duration(value: str) -> str:
    parse_duration(value)  # its ValueError says what a duration looks like
    return value


Text = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_text)]
Duration = Annotated[str, Field(min_length=1, max_length=32, examples=["30m", "2h", "7d"]),
                     AfterValidator(_duration)]
State = Literal["pending", "in_flight", "done", "dead", "cancelled"]
DestinationState = Literal["up", "backing_off", "suspended", "removed"]
assert set(get_args(State)) == set(STATES)


class Filters(BaseModel):
    """Which rows: every filter given must hold."""

    model_config = ConfigDict(extra="forbid")

    destination: Text | None = Field(None, description="rows of this destination")
    study: Text | None = Field(None, description="rows of this Study Instance UID")
    accession: Text | None = Field(None, description="rows of this Accession Number")
    patient: Text | None = Field(None, description="rows of this Patient ID")
    older_than: Duration | None = Field(
        None, description="rows received (or last retried) longer ago than this: 30m, 2h, 7d")

    def where(self, states: tuple[str, ...], ids: list[int] | None = None) -> RowFilter:
        return RowFilter(destination=self.destination, states=states, study_uid=self.study,
                         accession_number=self.accession, patient_id=self.patient,
                         older_than=parse_duration(self.older_than) if self.older_than is not None else None,
                         ids=tuple(ids) if ids is not None else None)


class DeadLetterQuery(Filters):
    limit: int = Field(100, ge=1, le=MAX_ROWS, description="rows shown at most, oldest first")


class RowQuery(DeadLetterQuery):
    state: State | None = Field(None, description="rows in this state")


class Selection(Filters):
    """Dead rows to retry or purge: some filter, or all of them."""

    ids: list[Annotated[StrictInt, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, min_length=1, max_length=MAX_ROWS, description="these rows (the ids of a listing)")
    all: StrictBool = Field(False, description="every dead row the filters given match (needed without a filter)")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(60.0, gt=0, le=600, allow_inf_nan=False,
                           description="seconds to wait for the reload to end (504 past it; it goes on)")


# -- answers -------------------------------------------------------------------------------


class Row(BaseModel):
    """A queue row, as ``dicom-bridge queue list --json`` shows it."""

    id: int
    destination: str
    in_config: bool = Field(description="whether its destination is in the configuration")
    state: State
    attempts: int
    priority: int
    age_seconds: float = Field(description="since it arrived, or was last retried")
    received_at: str | None
    done_at: str | None
    last_error: str | None
    next_attempt_at: str | None = Field(description="pending rows: when they are due")
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    accession_number: str
    calling_ae: str
    size: int


class Matching(BaseModel):
    """The rows a filter matches, of one destination."""

    in_config: bool
    counts: dict[str, int] = Field(description="rows by state")
    state: str | None = Field(description="the destination's state as the queue holds it")
    reason: str | None


class Rows(BaseModel):
    matching: int = Field(description="rows the filters match, however many are shown")
    destinations: dict[str, Matching]
    rows: list[Row]


class DestinationSummary(BaseModel):
    in_config: bool = Field(description="whether it is in the configuration the daemon runs")
    state: DestinationState
    reason: str | None = Field(description="why it is not up (or a note while it is)")
    until: str | None = Field(description="when its back-off ends (ISO 8601)")
    counts: dict[str, int] = Field(description="its rows by state, every state named")
    oldest_undelivered_seconds: float | None = Field(
        description="age of its oldest pending or in-flight row (None: it has none)")


class Totals(BaseModel):
    counts: dict[str, int] = Field(description="rows by state, every state named")
    rows: int


class QueueSummary(BaseModel):
    destinations: dict[str, DestinationSummary]
    totals: Totals


class Retried(BaseModel):
    retried: dict[str, int] = Field(description="rows put back to pending, by destination")
    total: int


class Purged(BaseModel):
    purged: dict[str, int] = Field(description="dead rows deleted, by destination")
    total: int
    spool_files_deleted: int = Field(description="spool files that no remaining row needed")


class Destination(BaseModel):
    type: str
    state: DestinationState
    reason: str | None
    until: str | None = Field(description="when its back-off ends (ISO 8601)")
    workers: int


class Destinations(BaseModel):
    destinations: dict[str, Destination]


class Resumed(BaseModel):
    destination: str
    was: DestinationState
    state: DestinationState


class Reloaded(BaseModel):
    reloaded: bool
