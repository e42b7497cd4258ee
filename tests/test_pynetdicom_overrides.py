"""The pinned pynetdicom overrides still find what they replace (see bridge/dimse/pynetdicom_overrides/).
These fail first when pynetdicom is upgraded under us."""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import inspect
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.acse
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dimse_primitives
import pynetdicom.dsutils
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.presentation
import pynetdicom.timer
import pynetdicom.transport
import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from bridge.dimse.pynetdicom_overrides import encoders, fast_path, messages, negotiation, reads, waits


def test_the_installed_pynetdicom_is_the_one_pinned_and_checked_against() -> None:
    from bridge.dimse.pynetdicom_overrides import REQUIRED_VERSION, check_version

    assert pynetdicom.__version__ == REQUIRED_VERSION
    check_version(pynetdicom.__version__)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"pynetdicom=={REQUIRED_VERSION}"' in pyproject


def test_any_other_pynetdicom_is_refused_with_the_reason() -> None:
    from bridge.dimse.pynetdicom_overrides import REQUIRED_VERSION, check_version
    from bridge.errors import StartError

    for other in ("3.0.5", "3.1.0", "2.1.1"):
        with pytest.raises(StartError) as refused:
            check_version(other)
        message = str(refused.value)
        assert f"pynetdicom {other} is installed" in message and f"checked against {REQUIRED_VERSION}" in message
        assert f"reinstall pynetdicom=={REQUIRED_VERSION}" in message


def test_dicom_bridge_run_with_another_pynetdicom_says_why_and_exits_1(tmp_path: Path) -> None:
    """As an operator who upgraded pynetdicom by hand would see it: before anything is
    bound or written."""
    from peers import free_port

    from bridge.dimse.pynetdicom_overrides import REQUIRED_VERSION

    config = tmp_path / "bridge.yaml"
    port = free_port()
    config.write_text(f"listen: {{port: {port}}}\ndata_dir: {tmp_path / 'data'}\n")
    run = subprocess.run(
        [sys.executable, "-c", "import sys, pynetdicom; pynetdicom.__version__ = '3.1.0'; "
                               "from bridge.cli.main import main; sys.exit(main(sys.argv[1:]))",
         "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "cannot start: pynetdicom 3.1.0 is installed" in run.stderr
    assert f"reinstall pynetdicom=={REQUIRED_VERSION}" in run.stderr
    assert not (tmp_path / "data").exists()


def test_pynetdicom_still_polls_where_the_overrides_expect():
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(pynetdicom.dul.DULServiceProvider.run_reactor)
    assert "time.sleep(0.001)" in inspect.getsource(pynetdicom.association.Association._run_reactor)
    # outgoing primitives go through to_provider_queue.put (which our queue turns into a wake-up)
    assert "self.to_provider_queue.put(" in inspect.getsource(pynetdicom.dul.DULServiceProvider.send_pdu)
    assert "self.to_provider_queue.queue[0]" in inspect.getsource(
        pynetdicom.dul.DULServiceProvider._process_recv_primitive
    )
    assert "msg_queue" in inspect.getsource(messages._pynetdicom_get_msg)
    # what wakes a prepared association's reactor (QUIET_WAIT) is all its loop looks at
    reactor = inspect.getsource(pynetdicom.association.Association._run_reactor)
    assert "while not self._kill" in reactor and "self.acse.is_release_requested()" in reactor
    assert "self._kill = True" in inspect.getsource(waits._pynetdicom_kill)
    assert "peek_next_pdu()" in inspect.getsource(pynetdicom.acse.ACSE.is_release_requested)
    assert "dul.to_user_queue.put(" in inspect.getsource(pynetdicom.fsm)


def test_pynetdicom_still_writes_chunked_data_sets_through_named_temporary_file():
    source = inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(delete=False" in source
    assert "self._data_set_file.write(" in source


def test_recv_reads_exactly_what_is_asked_across_short_reads():
    a, b = socket.socketpair()
    try:
        fake = type("FakeAssociationSocket", (), {"socket": b})()
        payload = bytes(range(256)) * 1000

        def send_slowly() -> None:
            for i in range(0, len(payload), 7000):
                a.sendall(payload[i:i + 7000])

        sender = threading.Thread(target=send_slowly)
        sender.start()
        assert reads._recv(fake, len(payload)) == payload
        sender.join()
        a.sendall(b"abc")
        a.close()
        assert reads._recv(fake, 10) == b"abc"  # the peer closed: what there was
    finally:
        b.close()


def test_recv_reads_a_pdu_longer_than_its_growth_step_and_what_arrived_of_a_longer_one():
    a, b = socket.socketpair()
    try:
        fake = type("FakeAssociationSocket", (), {"socket": b})()
        payload = os.urandom(3 * reads._RECV_CHUNK + 12345)
        sender = threading.Thread(target=a.sendall, args=(payload,))
        sender.start()
        assert reads._recv(fake, len(payload)) == payload
        sender.join()
        a.sendall(payload[:5000])
        a.close()
        assert reads._recv(fake, 0xFFFFFFF0) == payload[:5000]  # announced 4 GiB, sent 5000 bytes
    finally:
        b.close()


def test_what_the_listeners_bounds_rely_on_is_still_there():
    # awaiting_request: ARTIM runs from the connection (AE-5) until the request (AE-6) or
    # the connection's end before it (AA-2, AA-5); stop() is what sets _end_time
    assert "dul.artim_timer.start()" in inspect.getsource(pynetdicom.fsm.AE_5)
    for action in (pynetdicom.fsm.AE_6, pynetdicom.fsm.AA_2, pynetdicom.fsm.AA_5):
        assert "dul.artim_timer.stop()" in inspect.getsource(action), action.__name__
    timer = pynetdicom.timer.Timer(1)
    assert timer._end_time is None
    timer.start()
    assert timer._end_time is None
    timer.stop()
    assert timer._end_time is not None
    # _read_pdu_data is what pynetdicom calls in Sta13 with data waiting (where it reads no
    # more, and closes), and Evt17 there ends the association
    source = inspect.getsource(pynetdicom.dul.DULServiceProvider._is_transport_event)
    assert '"Sta13"' in source and "self._read_pdu_data()" in source
    assert ("Evt17", "Sta13") in pynetdicom.fsm.TRANSITION_TABLE
    # an invalid PDU (Evt19) is answered with A-ABORT in the states where the listener aborts
    for state in ("Sta2", "Sta6"):
        assert pynetdicom.fsm.TRANSITION_TABLE[("Evt19", state)] in ("AA-1", "AA-8")
    # pynetdicom serves a request whose fields are missing with nothing at all, and picks
    # the service class by the command's SOP Class UID: _receive_primitive answers first
    serve = inspect.getsource(pynetdicom.association.Association._serve_request)
    assert "if not msg.is_valid_request:" in serve and "uid_to_service_class(class_uid)" in serve
    # the acceptor waits acse_timeout for the request; the setter moves ARTIM with it
    assert "timeout=self.acse_timeout" in inspect.getsource(pynetdicom.association.Association.run_reactor)
    assert "artim_timer.timeout = value" in inspect.getsource(pynetdicom.association.Association.acse_timeout.fset)
    # do_action stops the reactor and raises when an action fails (_do_action aborts instead)
    do_action = inspect.getsource(reads._pynetdicom_do_action)
    assert "self.dul.kill_dul()" in do_action and "raise" in do_action
    # the server's connections go through socketserver's verify_request and
    # process_request_thread, and listen() takes request_queue_size
    assert "self.finish_request(request, client_address)" in inspect.getsource(
        pynetdicom.transport.ThreadedAssociationServer.process_request_thread)
    assert "server_class" in inspect.signature(pynetdicom.AE.make_server).parameters
    start_server = inspect.getsource(pynetdicom.AE.start_server)
    assert "server_class=ThreadedAssociationServer" in start_server and "self._servers.append(server)" in start_server
    assert "self.ae._servers.remove(" in inspect.getsource(pynetdicom.transport.AssociationServer.shutdown)


def test_the_network_timer_still_busy_restarts_is_the_one_the_reactor_checks():
    # still_busy: pynetdicom aborts an association whose DUL idle timer expired, checked in
    # the reactor between requests, and restarts that timer only when a PDU arrives
    assert "self.dul.idle_timer_expired()" in inspect.getsource(pynetdicom.association.Association._run_reactor)
    assert "return self._idle_timer.expired" in inspect.getsource(pynetdicom.dul.DULServiceProvider.idle_timer_expired)
    assert "self._idle_timer.restart()" in inspect.getsource(pynetdicom.dul.DULServiceProvider)
    timer = pynetdicom.timer.Timer(0.05)
    timer.start()
    time.sleep(0.1)
    assert timer.expired
    timer.restart()
    assert not timer.expired


def test_file_meta_bytes_are_those_pydicom_writes():
    import io

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    for args in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.55", "1.2.840.10008.1.2.1"),
                 ("1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.840.10008.1.2.4.201")]:
        kwargs = dict(zip(("sop_class_uid", "sop_instance_uid", "transfer_syntax"), args, strict=True))
        expected = io.BytesIO()
        write_file_meta_info(expected, create_file_meta(**kwargs))
        assert encoders._create_file_meta(**kwargs) == expected.getvalue()
    assert "write_file_meta_info(" in inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.decode_msg)
    assert "create_file_meta(" in inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.decode_msg)


def test_find_response_bytes_are_those_pynetdicom_sends():
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "x" * 60
    identifier.StudyDescription = "y" * 60
    encoded = pynetdicom.dsutils.encode(identifier, False, True)
    for status, comment, ident, max_pdu in [(0xFF00, None, encoded, 16384),
                                            (0xFF01, None, encoded, 100),  # data in fragments
                                            (0x0000, None, None, 16384),
                                            (0xA700, "source web: cannot connect", None, 0),
                                            (0xC001, "x" * 64, None, 16384)]:
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = 3
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
        rsp.Status = status
        rsp.ErrorComment = comment
        rsp.Identifier = io.BytesIO(ident) if ident is not None else None
        message = C_FIND_RSP()
        message.primitive_to_message(rsp)
        expected = [pdv for pdata in message.encode_msg(1, max_pdu) for _, pdv in pdata.presentation_data_value_list]
        command = encoders._find_response_command(rsp)
        assert expected[0] == b"\x03" + command
        if ident is None:
            assert len(expected) == 1
            continue
        size = max_pdu - 6
        data = [ident[i:i + size] for i in range(0, len(ident), size)]
        assert len(data) == (1 if max_pdu == 16384 else 2)
        assert expected[1:] == [(b"\x02" if i == len(data) - 1 else b"\x00") + d for i, d in enumerate(data)]
    assert "_set_command_group_length" in inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.primitive_to_message)


def test_identifiers_encoded_directly_are_those_pydicom_writes():
    from pydicom.valuerep import PersonName

    from bridge.dataset import charset

    def answer(**values: Any) -> Dataset:
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    answers = [
        answer(QueryRetrieveLevel="STUDY", RetrieveAETitle="DICOM_BRIDGE", StudyInstanceUID="1.2.840.10008.5.1.4",
               PatientName=PersonName("Yamada^Tarou=山田^太郎=やまだ^たろう"), PatientID="P1", StudyDate="20240101",
               StudyTime="101010.5", AccessionNumber="", StudyDescription="Thorax Übersicht",
               ModalitiesInStudy=["CT", "MR"], NumberOfStudyRelatedInstances="12", PatientBirthDate=None,
               StudyID="odd"),
        answer(QueryRetrieveLevel="SERIES", SeriesInstanceUID="1.2.3", SeriesNumber=7, Modality="MR",
               SeriesDescription="Müller", InstitutionName="Ünï", ImageComments="long",
               PatientWeight="72.5"),
        answer(QueryRetrieveLevel="IMAGE", SOPInstanceUID="1.2.3.4", SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
               InstanceNumber="1", TextValue="free text"),
    ]
    direct_for = {"ISO_IR 192": True, "ISO_IR 100": True, "ISO_IR 6": True, "\\ISO 2022 IR 87": False}
    for target, direct in direct_for.items():
        for ds in answers:
            fitted = copy.deepcopy(ds)
            charset.fit(fitted, target)
            for implicit in (True, False):
                assert (encoders._text_data_set(fitted, implicit) is not None) == direct, (target, implicit)
                assert encoders._identifier(fitted, implicit, True) == pynetdicom.dsutils.encode(fitted, implicit, True)
    with_sequence = answer(QueryRetrieveLevel="STUDY", ProcedureCodeSequence=[answer(CodeValue="X")])
    assert encoders._text_data_set(with_sequence, False) is None  # pydicom's writer encodes it
    assert encoders._identifier(with_sequence, False, True) == pynetdicom.dsutils.encode(with_sequence, False, True)
    assert "encode(" in inspect.getsource(pynetdicom.service_class.ServiceClass._c_find_scp)


def test_store_response_bytes_are_those_pynetdicom_sends():
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    for status, comment in [(0x0000, None), (0xC000, "Study Instance UID is missing"), (0x0124, "x" * 64)]:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
        rsp.Status = status
        rsp.ErrorComment = comment
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        (pdata,) = message.encode_msg(1, 16384)
        ((context_id, pdv),) = pdata.presentation_data_value_list
        assert pdv == b"\x03" + encoders._store_response_command(rsp)
        # sent directly by a network thread that served the request: the PDU the state
        # machine's DT-1 would send
        assert encoders._p_data_tf(1, encoders._store_response_command(rsp)) \
            == P_DATA_TF(pdata).encode()
    rsp.OffendingElement = [0x00100010]  # a field the direct encoder does not write: pynetdicom's way
    assert encoders._store_response_command(rsp) is None
    source = inspect.getsource(messages._pynetdicom_send_msg)
    assert "self.dul.send_pdu(pdata)" in source and "EVT_DIMSE_SENT" in source
    assert "dul._send(P_DATA_TF(primitive))" in inspect.getsource(pynetdicom.fsm.DT_1)
    assert 'return "Sta6"' in inspect.getsource(pynetdicom.fsm.DT_1)


def test_pynetdicom_still_pauses_its_reactor_the_way_get_msg_guards_against():
    source = inspect.getsource(pynetdicom.association.Association._run_reactor)
    assert source.index("self._reactor_checkpoint.wait()") < source.index("self.dimse.get_msg(block=False)")
    store = inspect.getsource(pynetdicom.association.Association.send_c_store)
    assert "self._reactor_checkpoint.clear()" in store and "while not self._is_paused" in store
    assert "self.dimse.get_msg(block=True)" in store
    # how a waiting send_*() call learns that the association was aborted
    assert "peek_next_pdu()" in inspect.getsource(pynetdicom.acse.ACSE.is_aborted)


def test_the_reactors_wait_passes_a_wake_up_on_to_a_waiting_get():
    """A requestor's send_*() blocks in msg_queue.get() while the reactor thread waits on
    the same queue in _association_sleep. A put wakes one waiter: when that is the
    reactor, the wake-up must go on to the get(), or the response sits in the queue until
    the DIMSE timeout."""
    import queue
    import types

    messages: queue.Queue[str] = queue.Queue()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(messages.get(timeout=10)))
    waiter.start()
    with messages.not_empty:  # the response arrived, and its put's wake-up went to the reactor
        messages.queue.append("response")
        messages.unfinished_tasks += 1

    class Reactor(threading.Thread):
        dimse = types.SimpleNamespace(msg_queue=messages)

        def run(self) -> None:
            waits._association_sleep(0.001)

    Reactor().start()
    waiter.join(5)
    assert got == ["response"]


def test_each_association_still_copies_the_acceptor_contexts_through_transport_deepcopy():
    source = inspect.getsource(pynetdicom.transport.RequestHandler._create_association)
    assert "assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)" in source
    assert set(vars(pynetdicom.presentation.PresentationContext())) == {
        "_context_id", "_abstract_syntax", "_transfer_syntax", "result", "_scu_role", "_scp_role",
        "_as_scp", "_as_scu",
    }  # the copy duplicates the one mutable attribute, the list of syntaxes


def test_copied_contexts_are_equal_and_independent():
    from pynetdicom import AllStoragePresentationContexts, build_context

    contexts = [build_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
                for cx in AllStoragePresentationContexts[:5]]
    copies = negotiation._copy_contexts(contexts)
    assert copies == contexts and all(a is not b for a, b in zip(copies, contexts, strict=True))
    copies[0].add_transfer_syntax("1.2.840.10008.1.2.2")
    copies[1].context_id = 3
    assert "1.2.840.10008.1.2.2" not in contexts[0].transfer_syntax
    assert contexts[1].context_id is None
    assert negotiation._copy_contexts({"a": [1]}) == {"a": [1]}  # anything else: deepcopy


# Overrides that are pynetdicom 3.0's own methods with a change (see each one's
# docstring), pinned to the exact source they copy: any change to an original must be
# looked at, and the override brought in line with it.
PINNED_COPIES = {
    "StorageServiceClass.SCP -> _storage_scp": (
        messages._pynetdicom_storage_scp,
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    ),
    "DULServiceProvider._read_pdu_data -> _read_pdu_data": (
        reads._pynetdicom_read_pdu_data,
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    ),
    "DIMSEServiceProvider.receive_primitive -> _receive_primitive": (
        messages._pynetdicom_receive_primitive,
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    ),
}


@pytest.mark.parametrize("name", PINNED_COPIES)
def test_each_copied_method_is_still_the_one_its_override_copies(name: str) -> None:
    original, digest = PINNED_COPIES[name]
    assert hashlib.sha256(inspect.getsource(original).encode()).hexdigest() == digest, (
        f"pynetdicom's {name.split(' ->')[0]} changed: bring {name.split('-> ')[1]} in line with it"
    )


def test_what_the_copies_rely_on_is_still_there() -> None:
    # _storage_scp shares the request's UID attributes
    assert "_affected_sop_instance_uid" in inspect.getsource(pynetdicom.dimse_primitives.DIMSEPrimitive)
    # _read_pdu_data does what the state machine's DT-2 and decode_msg do with data fragments
    assert "dul.assoc.dimse.receive_primitive(" in inspect.getsource(pynetdicom.fsm.DT_2)
    decode = inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.decode_msg)
    assert "self._data_set_file.write(data[1:])" in decode and "self._data_set_file.file.flush()" in decode
    # the reactor takes messages through get_msg, which keeps the flag _serve_inline reads
    assert "self.dimse.get_msg(block=False)" in inspect.getsource(pynetdicom.association.Association._run_reactor)


def test_what_the_sending_overrides_rely_on_is_still_there() -> None:
    # send_c_store takes a file's meta through the module-level split_dataset it imported
    assert "split_dataset(fpath)" in inspect.getsource(pynetdicom.association.Association.send_c_store)
    # the network thread writes every PDU through AssociationSocket.send (the socket lock)
    assert "self.socket.send(" in inspect.getsource(pynetdicom.dul.DULServiceProvider._send)
    # a file data set reaches send_msg as the primitive's _dataset_path
    assert "_dataset_path" in inspect.getsource(pynetdicom.dimse_messages.DIMSEMessage.primitive_to_message)
    # pynetdicom's Query/Retrieve service still dispatches C-MOVE and C-GET to these
    scp = inspect.getsource(pynetdicom.service_class.QueryRetrieveServiceClass.SCP)
    assert "self._move_scp(req, context)" in scp and "self._get_scp(req, context)" in scp


def test_file_meta_read_directly_is_what_pynetdicom_reads(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    from pynetdicom.dsutils import split_dataset

    from bridge.dimse.pynetdicom_overrides import sending

    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm", "rtplan.dcm"]
    for name in names:
        path = Path(get_testdata_file(name))
        theirs, their_offset = split_dataset(path)
        ours, our_offset = sending._split_dataset(path)
        assert our_offset == their_offset, name
        for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
            assert ours[keyword].value == theirs[keyword].value, (name, keyword)
    no_preamble = tmp_path / "raw.dcm"
    no_preamble.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[128:])
    with pytest.raises(Exception):  # noqa: B017, PT011 - as pynetdicom's own reader fails on it
        split_dataset(no_preamble)
    with pytest.raises(Exception):  # noqa: B017, PT011
        sending._split_dataset(no_preamble)


def _store_request_message(**fields: object) -> Any:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import encode

    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 1
    primitive.DataSet = BytesIO(b"")
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.encoded_command_set = BytesIO(encode(message.command_set, True, True))
    message.context_id = 3
    message._data_set_path = None
    message._data_set_file = None
    return message


_PRIMITIVE_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                     "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "_context_id")


@pytest.mark.parametrize("fields", [{}, {"Priority": 0}, {"Priority": 2, "MessageID": 65535},
                                    {"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 3}],
                         ids=["plain", "medium", "low-last-id", "move-originator"])
def test_store_requests_read_directly_are_what_pynetdicom_makes_of_them(fields: dict) -> None:
    message = _store_request_message(**fields)
    direct = fast_path._c_store_request(message)
    expected = message.message_to_primitive()
    if "MoveOriginatorMessageID" in fields:
        assert direct is None  # left to pynetdicom
        return
    assert direct is not None
    for name in _PRIMITIVE_FIELDS:
        assert getattr(direct, name) == getattr(expected, name), name
    assert type(direct.AffectedSOPInstanceUID) is type(expected.AffectedSOPInstanceUID)


def test_remembered_uids_are_the_same_and_failures_still_fail() -> None:
    remembered = negotiation._set_uid_remembered
    first = remembered("1.2.840.10008.1.2.1", "Transfer Syntax Name")
    assert first == "1.2.840.10008.1.2.1" and remembered("1.2.840.10008.1.2.1", "Transfer Syntax Name") is first
    assert remembered(b"1.2.840.10008.1.2", "Transfer Syntax Name") == "1.2.840.10008.1.2"
    assert remembered(None, "Transfer Syntax Name") is None
    for _ in range(2):  # not remembered: raises every time
        with pytest.raises(ValueError):
            remembered("x" * 65, "Abstract Syntax Name")
    # once installed (in a process of its own: this one's pynetdicom stays as it is),
    # the negotiation's modules use it
    check = ("from bridge.dimse import pynetdicom_overrides as o; "
             "from bridge.dimse.pynetdicom_overrides import negotiation as n; o.install(lambda: None, False); "
             "import pynetdicom.pdu_items as i, pynetdicom.presentation as p; "
             "assert i.set_uid is p.set_uid is n._set_uid_remembered")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0


# Run in a process of its own, with the overrides installed and the association threads'
# fallback wait made 30 s: anything the reactor must notice that does not wake it would
# take that long (or time the association out) instead of milliseconds.
_QUIET_SCENARIOS = r'''
import functools, socket, sys, tempfile, threading, time
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from bridge.dimse import pynetdicom_overrides as o
from bridge.dimse.pynetdicom_overrides import waits

o.install(functools.partial(tempfile.NamedTemporaryFile, delete=False), any_sop_class=False)
waits.QUIET_WAIT = 30.0

def prepared(event):
    o.prepare(event.assoc, serve_inline=True)

server_ae = AE(ae_title="QUIET")
server_ae.add_supported_context(Verification)
server = server_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, prepared)])
port = server.server_address[1]

def requestor(prepare_it):
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    handlers = [(evt.EVT_CONN_OPEN, lambda e: o.prepare(e.assoc, max_queued=8))] if prepare_it else []
    assoc = ae.associate("127.0.0.1", port, ae_title="QUIET", evt_handlers=handlers)
    assert assoc.is_established
    return assoc

def acceptor_gone(deadline=20):
    end = time.monotonic() + deadline
    while server.active_associations and time.monotonic() < end:
        time.sleep(0.005)
    assert not server.active_associations, "the acceptor's association is still running"

def timed(name, run):
    started = time.monotonic()
    run()
    print(name, round(time.monotonic() - started, 3), flush=True)

def echo_then_release():
    assoc = requestor(False)
    assert assoc.send_c_echo().Status == 0  # queued for the association thread: a put wakes it
    assoc.release()  # the A-RELEASE-RP comes from the acceptor's reactor
    assert assoc.is_released
    acceptor_gone()

def peer_aborts():
    requestor(False).abort()
    acceptor_gone()

def connection_dropped():
    assoc = requestor(False)
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    acceptor_gone()
    assoc.abort()

def prepared_requestor():  # its reactor paused by each send_*(), then released
    assoc = requestor(True)
    for _ in range(3):
        assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released
    acceptor_gone()

def local_abort():  # as the daemon's shutdown aborts what is left: from another thread
    assoc = requestor(False)
    server.active_associations[0].abort()
    acceptor_gone()
    end = time.monotonic() + 20
    while assoc.is_established and time.monotonic() < end:
        time.sleep(0.005)
    assert not assoc.is_established

for name, run in [("echo_then_release", echo_then_release), ("peer_aborts", peer_aborts),
                  ("connection_dropped", connection_dropped), ("prepared_requestor", prepared_requestor),
                  ("local_abort", local_abort)]:
    timed(name, run)
'''


def test_a_quiet_association_thread_is_woken_by_everything_its_reactor_looks_for(tmp_path) -> None:
    script = tmp_path / "quiet.py"
    script.write_text(_QUIET_SCENARIOS)
    repo = str(Path(__file__).resolve().parent.parent)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": repo})
    assert run.returncode == 0, run.stdout + run.stderr
    took = dict(line.split() for line in run.stdout.splitlines())
    assert set(took) == {"echo_then_release", "peer_aborts", "connection_dropped", "prepared_requestor",
                         "local_abort"}
    slow = {name: seconds for name, seconds in took.items() if float(seconds) > 5}
    assert not slow, f"waited for the reactor's fallback wait: {slow}"


# -- associations that send from a handler, and TLS ---------------------------------------
#
# Each scenario runs in a process of its own (``_run_scenario``) with the overrides
# installed, between pynetdicom AEs set up as the bridge sets up its own: an acceptor
# prepared as the listener prepares its associations (``serve_inline``), a requestor as
# ``bridge.dimse.scu`` prepares its (a bounded outgoing queue). Each prints what it
# received and how long it took; the test checks both.

SCENARIO_DEADLINE = 30.0  # seconds; each scenario takes well under one on an idle machine


def _run_scenario(name: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    call = f"import test_pynetdicom_overrides as t; t.{name}(*{[str(tmp_path), *args]!r})"
    run = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=4 * SCENARIO_DEADLINE,
                         env={**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}"})
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
    assert result["seconds"] < SCENARIO_DEADLINE, result
    return result


def _installed(tmp: str) -> None:
    """The overrides and switches as the daemon installs them, files received into ``tmp``."""
    from bridge.dimse import pynetdicom_overrides

    incoming = Path(tmp) / "incoming"
    incoming.mkdir(exist_ok=True)
    pynetdicom_overrides.install(functools.partial(tempfile.NamedTemporaryFile, delete=False, dir=incoming),
                                 any_sop_class=False)


def _listener(ae: Any, handlers: list[Any], ssl_context: ssl.SSLContext | None = None) -> Any:
    """``ae`` serving on a free port, its associations prepared as the listener prepares
    its own: it serves C-ECHO and the requests of the services ``handlers`` handle."""
    from pynetdicom import dimse_primitives as p
    from pynetdicom import evt

    from bridge.dimse import pynetdicom_overrides

    requests = {evt.EVT_C_GET: p.C_GET, evt.EVT_N_ACTION: p.N_ACTION, evt.EVT_C_STORE: p.C_STORE}
    served = tuple(requests[event] for event, _ in handlers) + (p.C_ECHO,)

    def serves(primitive: Any) -> bool:  # as the listener's services say (bridge.dimse.listener.Service)
        return isinstance(primitive, served) and primitive.MessageIDBeingRespondedTo is None

    def on_open(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pynetdicom_overrides.prepare(event.assoc, serve_inline=True, serves=serves)

    return ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context,
                           evt_handlers=[(pynetdicom.evt.EVT_CONN_OPEN, on_open), *handlers])


def _requestor_handlers(*handlers: Any) -> list[Any]:
    """Event handlers for ``AE.associate``: the association prepared as ``bridge.dimse.scu`` does."""
    from bridge.dimse import pynetdicom_overrides
    from bridge.dimse.scu import MAX_QUEUED_PDUS

    def on_open(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pynetdicom_overrides.prepare(event.assoc, max_queued=MAX_QUEUED_PDUS)

    return [(pynetdicom.evt.EVT_CONN_OPEN, on_open), *handlers]


def _pixels_digest(path: str | Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def _report(started: float, **found: Any) -> None:
    print(json.dumps({"seconds": round(time.monotonic() - started, 3), **found}), flush=True)


def _ct_images(tmp: str, count: int, size: int) -> dict[str, str]:
    """``count`` CT images of one study in ``tmp``: {SOP Instance UID: digest of the pixels}."""
    from corpus import ct_series

    return {pydicom.dcmread(p).SOPInstanceUID: _pixels_digest(p) for p in ct_series(Path(tmp) / "ct", count, size)}


def _get_scp(tmp: str) -> Any:
    """A listener that serves C-GET of the study in ``tmp``/ct: each image a C-STORE
    sub-operation sent by the C-GET handler on the association it came in on."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    files = sorted((Path(tmp) / "ct").iterdir())
    study = pydicom.dcmread(files[0]).StudyInstanceUID

    def on_get(event: Any) -> Any:
        assert event.identifier.StudyInstanceUID == study
        yield len(files)
        for path in files:
            yield 0xFF00, pydicom.dcmread(path)

    ae = AE(ae_title="SEAM")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    return _listener(ae, [(evt.EVT_C_GET, on_get)]), study


def scenario_c_get_from_getscu(tmp: str) -> None:
    _installed(tmp)
    images = _ct_images(tmp, 5, 512)  # 512 KiB each: many P-DATA PDUs per sub-operation
    server, study = _get_scp(tmp)
    out = Path(tmp) / "got"
    out.mkdir()
    started = time.monotonic()
    run = subprocess.run(
        ["/usr/bin/getscu", "-S", "-aet", "GETSCU", "-aec", "SEAM", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.server_address[1])],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=SCENARIO_DEADLINE)
    seconds = time.monotonic() - started
    server.shutdown()
    assert run.returncode == 0, run.stdout + run.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID: _pixels_digest(p) for p in out.iterdir()}
    print(json.dumps({"seconds": round(seconds, 3), "sent": images, "received": got}), flush=True)


def scenario_c_get_from_pynetdicom(tmp: str) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    _installed(tmp)
    images = _ct_images(tmp, 5, 512)
    server, study = _get_scp(tmp)
    got: dict[str, str] = {}

    def on_store(event: Any) -> int:
        got[pydicom.dcmread(event.dataset_path).SOPInstanceUID] = _pixels_digest(event.dataset_path)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SCENARIO_DEADLINE
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="SEAM",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=_requestor_handlers((evt.EVT_C_STORE, on_store)))
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    server.shutdown()
    assert statuses[-1] == 0x0000 and set(statuses[:-1]) <= {0xFF00}, statuses
    _report(started, sent=images, received=got)


def scenario_c_get_without_a_handler(tmp: str) -> None:
    """A C-GET to a listener that accepts the context but has no C-GET handler: aborted,
    as every request for a service the listener does not provide."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    _installed(tmp)
    ae = AE(ae_title="SEAM")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    server = _listener(ae, [])
    scu = AE(ae_title="GETSCU")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = SCENARIO_DEADLINE
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    started = time.monotonic()
    assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SEAM", evt_handlers=_requestor_handlers())
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    answers = [status.get("Status") for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    server.shutdown()
    _report(started, answers=answers, aborted=assoc.is_aborted)


COMMITMENTS = 20  # transactions per scenario, one after the other on one association


def scenario_storage_commitment(tmp: str, when: str) -> None:
    """N-ACTIONs to a listener whose handler sends the N-EVENT-REPORT on the same
    association: from the handler itself (``when == "in-handler"``, before the N-ACTION
    response) or from a thread it starts (``"after"``, as a commitment that takes time,
    racing the N-ACTION response)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    _installed(tmp)
    instance = "1.2.840.10008.1.20.1.1"  # the Storage Commitment Push Model SOP Instance (PS3.4 J.3.5)
    reported: list[int] = []

    def on_action(event: Any) -> tuple[int, None]:
        request = event.action_information
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        report.ReferencedSOPSequence = request.ReferencedSOPSequence

        def send() -> None:
            status, _ = event.assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, instance)
            reported.append(status.get("Status"))

        if when == "in-handler":
            send()
        else:
            threading.Thread(target=send).start()
        return 0x0000, None

    ae = AE(ae_title="SEAM")
    ae.add_supported_context(StorageCommitmentPushModel)
    server = _listener(ae, [(evt.EVT_N_ACTION, on_action)])

    received: list[Any] = []
    reports = threading.Semaphore(0)

    def on_report(event: Any) -> tuple[int, None]:
        received.append((event.event_type, event.event_information.TransactionUID,
                         [item.ReferencedSOPInstanceUID for item in event.event_information.ReferencedSOPSequence]))
        reports.release()
        return 0x0000, None

    scu = AE(ae_title="MODALITY")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = SCENARIO_DEADLINE
    scu.add_requested_context(StorageCommitmentPushModel)
    started = time.monotonic()
    assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SEAM",
                          evt_handlers=_requestor_handlers((evt.EVT_N_EVENT_REPORT, on_report)))
    assert assoc.is_established
    actions = []
    for number in range(COMMITMENTS):
        request = Dataset()
        request.TransactionUID = f"1.2.3.4.5.{number}"
        request.ReferencedSOPSequence = [Dataset(), Dataset()]
        for item, uid in zip(request.ReferencedSOPSequence, ("1.2.3.1", "1.2.3.2"), strict=True):
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = uid
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, instance, msg_id=number + 1)
        actions.append(status.get("Status"))
        if not reports.acquire(timeout=SCENARIO_DEADLINE):
            break  # no N-EVENT-REPORT: the association is probably gone
    deadline = time.monotonic() + SCENARIO_DEADLINE
    while len(reported) < len(received) and time.monotonic() < deadline:  # the last send_n_event_report returns
        time.sleep(0.01)
    assoc.release()
    server.shutdown()
    _report(started, actions=actions, received=received, answered=reported)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` and its key (``cryptography`` if installed, else openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def scenario_tls(tmp: str) -> None:
    """C-ECHO, then C-STOREs of images of several MB (hundreds of P-DATA PDUs each), over TLS."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    _installed(tmp)
    images = _ct_images(tmp, 3, 1792)  # 6.1 MiB of pixels each
    cert, key = _self_signed_certificate(Path(tmp))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    got: dict[str, str] = {}

    def on_store(event: Any) -> int:
        got[pydicom.dcmread(event.dataset_path).SOPInstanceUID] = _pixels_digest(event.dataset_path)
        return 0x0000

    ae = AE(ae_title="SEAM")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    server = _listener(ae, [(evt.EVT_C_STORE, on_store)], ssl_context=server_context)
    scu = AE(ae_title="MODALITY")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = SCENARIO_DEADLINE
    scu.add_requested_context(Verification)
    scu.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    started = time.monotonic()
    assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SEAM",
                          tls_args=(client_context, "localhost"), evt_handlers=_requestor_handlers())
    assert assoc.is_established and isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    echoed = assoc.send_c_echo().Status
    statuses = [assoc.send_c_store(path).Status for path in sorted((Path(tmp) / "ct").iterdir())]
    assoc.release()
    server.shutdown()
    _report(started, echoed=echoed, statuses=statuses, sent=images, received=got)


def scenario_tls_coalesced(tmp: str) -> None:
    """C-STOREs over TLS from a peer that writes each whole message at once (command and
    data PDUs in one TLS write, as a buffered writer does): the network thread finds the
    next PDUs already decrypted, in the TLS layer's buffer, while the socket has nothing
    more to read until the answer goes out."""
    from corpus import ct_series, data_set_bytes
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage
    from rawpeer import CT_IMAGE, EXPLICIT_LE, RawPeer, command_set, p_data, store_command

    _installed(tmp)
    files = ct_series(Path(tmp) / "ct", 100, 64)
    sent = {pydicom.dcmread(p).SOPInstanceUID: _pixels_digest(p) for p in files}
    cert, key = _self_signed_certificate(Path(tmp))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    got: dict[str, str] = {}

    def on_store(event: Any) -> int:
        got[pydicom.dcmread(event.dataset_path).SOPInstanceUID] = _pixels_digest(event.dataset_path)
        return 0x0000

    ae = AE(ae_title="SEAM")
    ae.add_supported_context(CTImageStorage, EXPLICIT_LE)
    server = _listener(ae, [(evt.EVT_C_STORE, on_store)], ssl_context=server_context)
    peer = RawPeer(server.server_address[1], timeout=SCENARIO_DEADLINE)
    peer.sock = ssl.create_default_context(cafile=str(cert)).wrap_socket(peer.sock, server_hostname="localhost")
    started = time.monotonic()
    assert peer.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
    statuses = []
    for number, path in enumerate(files, 1):
        data = data_set_bytes(path)
        pieces = [data[i:i + 128] for i in range(0, len(data), 128)]  # 65 PDUs per message
        message = p_data(1, 3, command_set(store_command(CT_IMAGE, pydicom.dcmread(path).SOPInstanceUID, number)))
        message += b"".join(p_data(1, 2 if i == len(pieces) - 1 else 0, piece) for i, piece in enumerate(pieces))
        assert peer.send(message)
        statuses.append(peer.answer().status)
    assert peer.release().kind == "release"
    peer.close()
    server.shutdown()
    _report(started, statuses=statuses, sent=sent, received=got)


@pytest.mark.parametrize("peer", ["getscu", "pynetdicom"])
def test_a_c_get_handler_sends_its_sub_operations_on_the_listeners_association(tmp_path: Path, peer: str) -> None:
    scenario = "scenario_c_get_from_getscu" if peer == "getscu" else "scenario_c_get_from_pynetdicom"
    result = _run_scenario(scenario, tmp_path)
    assert result["received"] == result["sent"] and len(result["sent"]) == 5


def test_a_request_for_a_service_without_a_handler_is_still_aborted(tmp_path: Path) -> None:
    result = _run_scenario("scenario_c_get_without_a_handler", tmp_path)
    assert result["aborted"] and result["answers"] == [None]


@pytest.mark.parametrize("when", ["in-handler", "after"])
def test_an_n_action_handler_sends_an_n_event_report_on_the_listeners_association(tmp_path: Path, when: str) -> None:
    result = _run_scenario("scenario_storage_commitment", tmp_path, when)
    assert result["actions"] == [0x0000] * COMMITMENTS
    assert result["received"] == [[1, f"1.2.3.4.5.{n}", ["1.2.3.1", "1.2.3.2"]] for n in range(COMMITMENTS)]
    assert result["answered"] == [0x0000] * COMMITMENTS


def test_tls_carries_echo_and_large_stores_through_the_overrides(tmp_path: Path) -> None:
    result = _run_scenario("scenario_tls", tmp_path)
    assert result["echoed"] == 0x0000 and result["statuses"] == [0x0000] * 3
    assert result["received"] == result["sent"] and len(result["sent"]) == 3


def test_tls_messages_written_at_once_are_read_from_the_tls_buffer(tmp_path: Path) -> None:
    result = _run_scenario("scenario_tls_coalesced", tmp_path)
    assert result["statuses"] == [0x0000] * 100
    assert result["received"] == result["sent"]
    # Under a second on an idle machine. A network thread that waited for its socket
    # while the next PDU sat decrypted in the TLS buffer would sleep its full 1 ms turn
    # before each of the 6,500 PDUs: 6.5 s at the very least.
    assert result["seconds"] < 5.0, result["seconds"]
