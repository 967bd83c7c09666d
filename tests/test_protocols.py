"""The two wire protocols against their documents, and the agent's handling of each stats reply.

Each protocol's error codes are defined once in code (``edge_agent/wire/score.py``, ``edge_agent/wire/stats.py``)
and described in a document beside it; these tests keep the two the same set. The shipping test runs the real
DiskSpool and Shipper against a real ROUTER socket that answers with refusals.
"""
from __future__ import annotations

import doctest
import threading
import time
from pathlib import Path

import pytest
import zmq

from edge_agent.daemon import drift
from edge_agent.daemon.shipping import DiskSpool, Shipper
from edge_agent.wire import audit, links, packages, score, stats
from edge_agent.wire.codec import decode_trusted, encode

WIRE = Path(score.__file__).parent


def _table_after(document: Path, marker: str) -> list[list[str]]:
    """The body rows of the first Markdown table after the line that starts with ``marker``: cells without
    their backticks."""
    lines = document.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]   # after the header and the separator


def _constants(namespace: type) -> set[str]:
    return {value for name, value in vars(namespace).items() if name.isupper()}


def test_score_error_codes_in_code_and_in_protocol_md_are_the_same_set():
    documented = [row[0] for row in _table_after(WIRE / "PROTOCOL.md", "Error codes")]
    assert len(documented) == len(set(documented))
    assert set(documented) == _constants(score.Code)


def test_stats_refusal_codes_in_code_and_in_stats_protocol_md_are_the_same_set_with_the_same_kind():
    rows = _table_after(WIRE / "STATS_PROTOCOL.md", "Refusal codes")
    documented = {row[0]: row[1] for row in rows}
    assert len(documented) == len(rows)
    assert set(documented) == _constants(stats.Code) == set(stats.REFUSALS)
    assert documented == {code: kind.value for code, kind in stats.REFUSALS.items()}
    assert {"permanent", "transient"} == set(documented.values())


def test_every_stats_message_type_has_a_section_in_stats_protocol_md():
    headings = {line.split()[1] for line in (WIRE / "STATS_PROTOCOL.md").read_text().splitlines()
                if line.startswith("## ")}
    assert {stats.STATS, stats.ACK, stats.ERROR} <= headings


@pytest.mark.parametrize("reply, expected", [
    ({"type": "ack", "v": 1, "agent_id": "a", "seq": 3, "duplicate": True}, stats.Reply.ACK),
    (stats.refusal(stats.Code.INVALID_MESSAGE, "bad", 3), stats.Reply.PERMANENT),
    (stats.refusal(stats.Code.STORE_FAILED, "locked", 3), stats.Reply.TRANSIENT),
    (stats.refusal(stats.Code.AGENT_ID_MISMATCH, "not the key's id", 3), stats.Reply.PERMANENT),
    (stats.refusal("a_code_from_a_newer_collector", "?", 3), stats.Reply.TRANSIENT),
    ({"type": "something_else", "seq": 3}, stats.Reply.TRANSIENT),
    (stats.refusal(stats.Code.INVALID_MESSAGE, "not msgpack", None), stats.Reply.UNRELATED),
    ({"type": "ack", "v": 1, "agent_id": "a", "seq": 2, "duplicate": False}, stats.Reply.UNRELATED),
    (["not", "a", "map"], stats.Reply.UNRELATED),
])
def test_a_stats_reply_is_classified_for_the_window_in_flight(reply, expected):
    assert stats.classify_reply(reply, 3) is expected


def test_packages_error_codes_in_code_and_in_packages_protocol_md_are_the_same_set():
    documented = [row[0] for row in _table_after(WIRE / "PACKAGES_PROTOCOL.md", "Error codes")]
    assert len(documented) == len(set(documented))
    assert set(documented) == _constants(packages.Code)


def test_every_packages_message_type_and_the_audit_message_have_a_section_in_their_documents():
    for document, kinds in (("PACKAGES_PROTOCOL.md", {packages.ASSIGNMENT, packages.CHUNK, packages.ERROR}),
                            ("STATS_PROTOCOL.md", {audit.AUDIT, "shadow"})):
        headings = {line.split()[1] for line in (WIRE / document).read_text().splitlines() if line.startswith("## ")}
        assert kinds <= headings, document


@pytest.mark.parametrize("module", [stats, drift, links, packages, audit])
def test_the_doctest_examples_hold(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


class RefusingCollector:
    """A ROUTER on a thread that answers each window with the next reply its script gives for that seq."""

    def __init__(self, script: dict[int, list[str]]):
        self.script = script
        self.received: list[dict] = []
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            identity, payload = self.router.recv_multipart()
            message = decode_trusted(payload)
            self.received.append(message)
            seq = message["seq"]
            answer = self.script[seq].pop(0)
            reply = (stats.ack(stats.StatsWindow(message), duplicate=False) if answer == stats.ACK
                     else stats.refusal(answer, f"scripted {answer}", seq))
            self.router.send_multipart([identity, encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.router.close(linger=0)
        self.context.term()


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_permanent_refusal_drops_the_window_as_a_reported_loss_and_a_transient_one_is_sent_again(tmp_path):
    collector = RefusingCollector({1: [stats.Code.INVALID_MESSAGE],
                                   2: [stats.Code.STORE_FAILED, stats.ACK]})
    spool = DiskSpool(tmp_path / "spool")
    shipper = Shipper(collector.endpoint, spool, agent_id="a", tester="t", ack_timeout_s=0.5)
    shipper.start()
    try:
        shipper.submit({"window": "first"})
        _wait_for(lambda: spool.dropped_total == 1)
        shipper.submit({"window": "second"})
        _wait_for(lambda: shipper.acked == 1)
    finally:
        shipper.stop()
        collector.close()
    assert [(m["seq"], m["window"]) for m in collector.received] == [(1, "first"), (2, "second"), (2, "second")]
    assert spool.pending == 0 and spool.dropped_ranges == [[1, 1]] and shipper.resends == 1
    # The loss travels upstream with the next window, both times it was sent.
    assert [m["spool"]["dropped_seq_ranges"] for m in collector.received[1:]] == [[[1, 1]], [[1, 1]]]
