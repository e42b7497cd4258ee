"""What the sources that fetch by series (``dicomweb``, ``dimse``, ``rad69``) do alike
with the references they are asked for: group them by study and series, first seen
first, and cut the groups into requests of a bounded size."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from bridge.model import InstanceRef

Series = tuple[str, str]  # (Study Instance UID, Series Instance UID)


def by_series(refs: Iterable[InstanceRef]) -> tuple[dict[Series, dict[str, InstanceRef]], list[InstanceRef]]:
    """``refs`` by study and series, each by SOP Instance UID, in the order first seen;
    and the references that name an instance a second time (not grouped again)."""
    groups: dict[Series, dict[str, InstanceRef]] = {}
    again: list[InstanceRef] = []
    for ref in refs:
        group = groups.setdefault((ref.study_uid, ref.series_uid), {})
        if ref.sop_instance_uid in group:
            again.append(ref)
        else:
            group[ref.sop_instance_uid] = ref
    return groups, again


def batches(groups: Mapping[Series, Mapping[str, InstanceRef]], size: int) -> list[list[InstanceRef]]:
    """Each series' references cut into lists of at most ``size``, series after series."""
    out: list[list[InstanceRef]] = []
    for group in groups.values():
        refs: Sequence[InstanceRef] = list(group.values())
        out += [list(refs[i:i + size]) for i in range(0, len(refs), size)]
    return out
