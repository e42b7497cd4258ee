"""The P-DATA fast path: a C-STORE's data set written by the network thread from the received PDU.

Every P-DATA-TF PDU is copied whole, decoded into PDU and primitive objects, queued as a
state-machine event and handed through the state machine to the DIMSE layer, which
copies each fragment again before writing it to the data set's file. For the PDUs that
only continue a C-STORE data set (all but its last few kilobytes), the DUL thread writes
the fragments straight from the received buffer to that file (``_take_data_set_pdu``,
called by ``reads._read_pdu_data``), which is all pynetdicom ends up doing with them; a
PDU that ends the data set is passed to the DIMSE layer directly, as the state machine's
action DT-2 would. A PDU that holds a whole plain C-STORE command starts the message the
same way (``_take_store_command_pdu``: its data set's file and File Meta, as
``decode_msg`` does, with the command read from its bytes instead of through pydicom),
and ``_c_store_request`` makes the request primitive from those bytes. Anything else
(commands with other elements, other PDUs, a state other than Sta6, a handler bound to
the events this skips) goes through pynetdicom.
"""

from __future__ import annotations

import os
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from bridge.dataset.uids import is_valid_uid

# Events whose handlers would see what the fast paths skip (the PDU's bytes and objects,
# the state machine's transition, a command set decoded by pydicom).
_FAST_PATH_UNWATCHED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION, evt.EVT_DIMSE_RECV)


def _may_take(dul: Any) -> bool:
    """Whether the network thread may handle a P-DATA-TF PDU itself: the association is
    established (Sta6), nothing received before it waits to be handled, and no handler
    is bound to the events the fast paths skip."""
    return dul.state_machine.current_state == "Sta6" and not dul.event_queue.queue \
        and not dul._recv_pdu.queue and not any(dul.assoc.get_handlers(event) for event in _FAST_PATH_UNWATCHED)


def _take_data_set_pdu(dul: Any, body: bytearray) -> bool:
    """Write a P-DATA-TF PDU's data set fragments straight to the file of the C-STORE
    being received, if that is all the PDU holds (an ending fragment last, if any).
    Returns False, having done nothing, otherwise."""
    assoc = dul.assoc
    message = assoc.dimse.message
    target = getattr(message, "_data_set_file", None) if message is not None else None
    if target is None:
        return False
    view = memoryview(body)
    fragments: list[memoryview] = []
    ending: tuple[int, bytes] | None = None
    offset, end = 0, len(body)
    while offset < end:
        if ending is not None or end - offset < 6:
            return False  # something after the data set's last fragment, or a broken item
        (length,) = struct.unpack_from(">L", body, offset)
        context_id, control = body[offset + 4], body[offset + 5]
        if length < 2 or offset + 4 + length > end or control & 1:
            return False  # a malformed item, or command fragments: pynetdicom's path
        value = view[offset + 6:offset + 4 + length]
        if control & 2:
            ending = (context_id, bytes(view[offset + 5:offset + 4 + length]))
        else:
            fragments.append(value)
        offset += 4 + length
    for fragment in fragments:
        target.write(fragment)
    if fragments:
        target.file.flush()
    if ending is not None:
        # What the state machine's DT-2 does with the PDU, without the detour.
        primitive = P_DATA()
        primitive.presentation_data_value_list.append(ending)
        assoc.dimse.receive_primitive(primitive)
    return True


def _take_store_command_pdu(dul: Any, body: bytearray) -> bool:
    """Start a C-STORE from a PDU that holds its whole command set and nothing else,
    as ``DIMSEMessage.decode_msg`` would: the message, its data set's file in the spool
    and the File Meta written to it, without decoding the command through pydicom
    (``_plain_store_command`` reads it, ``_c_store_request`` makes the primitive of it
    later). Returns False, having done nothing, for anything else."""
    if len(body) < 6 or not _config.STORE_RECV_CHUNKED_DATASET:
        return False
    assoc = dul.assoc
    dimse = assoc.dimse
    (length,) = struct.unpack_from(">L", body, 0)
    context_id, control = body[4], body[5]
    if dimse.message is not None or length + 4 != len(body) or control & 3 != 3 \
            or context_id not in assoc._accepted_cx:
        return False
    raw = bytes(body[6:])
    command = _plain_store_command(raw)
    if command is None or command[4] == 0x0101:  # not a plain C-STORE request, or no data set
        return False
    # DIMSEMessage.__init__ without its fifteen empty command elements, each set through
    # pydicom: nothing reads the command set of a message
    # started here (no EVT_DIMSE_RECV handler, see _may_take); _receive_primitive
    # decodes it when pynetdicom needs it.
    message = C_STORE_RQ.__new__(C_STORE_RQ)
    message.context_id = context_id
    message.encoded_command_set = BytesIO(raw)
    message.encoded_command_set.seek(0, os.SEEK_END)  # as if written
    message.data_set = BytesIO()
    message.command_set = Dataset()
    message._bridge_command = command  # type: ignore[attr-defined]  # for _c_store_request, later
    dm: Any = pynetdicom.dimse_messages  # its file factory and File Meta writer, as installed
    target = dm.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    message._data_set_file = target
    message._data_set_path = Path(target.name)
    target.write(b"\x00" * 128)
    target.write(b"DICM")
    dm.write_file_meta_info(target, dm.create_file_meta(
        sop_class_uid=UID(command[2]), sop_instance_uid=UID(command[3]),
        transfer_syntax=assoc._accepted_cx[context_id].transfer_syntax[0],
    ))
    dimse.message = message
    return True


# with any other element, or with the Move Originator ones, is left to pynetdicom.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})


def _plain_store_command(raw: bytes) -> tuple[int, int, str, str, int] | None:
    """(Message ID, Priority, Affected SOP Class UID, Affected SOP Instance UID,
    Command Data Set Type) of a C-STORE-RQ command set (implicit VR little endian) that
    has only the usual elements, all well formed; None for anything else."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        if group != 0 or element not in _STORE_RQ_ELEMENTS or offset + 8 + length > len(raw):
            return None
        values[element] = raw[offset + 8:offset + 8 + length]
        offset += 8 + length
    if offset != len(raw) or any(len(values.get(e, b"")) != 2 for e in (0x0100, 0x0110, 0x0700, 0x0800)):
        return None
    (command,), (message_id,), (priority,), (data_set_type,) = (
        struct.unpack("<H", values[e]) for e in (0x0100, 0x0110, 0x0700, 0x0800)
    )
    sop_class = values.get(0x0002, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    sop_instance = values.get(0x1000, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    if command != 0x0001 or priority not in (0, 1, 2) or not is_valid_uid(sop_class) \
            or not is_valid_uid(sop_instance):
        return None
    return message_id, priority, sop_class, sop_instance, data_set_type


def _c_store_request(message: Any) -> C_STORE | None:
    """``message.message_to_primitive()`` for a plain C-STORE request, read straight from
    the command's bytes (implicit VR little endian): the same primitive, with the same
    checks, without converting each element through pydicom and setting it through the
    primitive's validating setters. None for anything else, which pynetdicom converts."""
    if type(message) is not C_STORE_RQ:
        return None
    command = getattr(message, "_bridge_command", None) or _plain_store_command(
        message.encoded_command_set.getvalue())
    if command is None:
        return None  # pynetdicom's conversion says what is wrong
    message_id, priority, sop_class, sop_instance, _ = command
    primitive = C_STORE()
    primitive._message_id = message_id
    primitive._affected_sop_class_uid = UID(sop_class)
    primitive._affected_sop_instance_uid = UID(sop_instance)
    primitive._priority = priority
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive
