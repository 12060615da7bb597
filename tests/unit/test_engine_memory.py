"""What the in-memory stores add to the contract suite: exact boundaries and what they say."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from concordance_provider.engine.mapper import EventMessage
from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore
from concordance_provider.engine.persistence import AlreadyAppended, AppendConflict, EventTooLarge, StateConflict


def raw(size: int = 2, message_id: str = "m1") -> EventMessage:
    return EventMessage("cc.events.t.s.K", b"x" * size, {"Nats-Msg-Id": message_id})


async def test_a_message_of_exactly_the_maximum_size_is_stored_one_more_byte_is_not():
    log = InMemoryEventLog(max_payload=10)
    assert await log.append("s", "K", [raw(10)], expected_last_seq=0) == [1]
    with pytest.raises(EventTooLarge, match=r"^cc.events.t.s.K: 11 bytes is over the maximum payload of 10$"):
        await log.append("s", "K", [raw(11, "m2")], expected_last_seq=1)


async def test_refusals_say_why_as_jetstream_does():
    log = InMemoryEventLog()
    await log.append("s", "K", [raw()], expected_last_seq=0)
    with pytest.raises(AppendConflict, match=r"^wrong last sequence: 1$"):
        await log.append("s", "K", [raw(message_id="m2")], expected_last_seq=0)
    with pytest.raises(AlreadyAppended, match=r"^s.K: a message id is already stored$"):
        await log.append("s", "K", [raw()], expected_last_seq=1)
    states = InMemoryStateStore()
    with pytest.raises(StateConflict, match=r"^k: wrong last sequence: 0$"):
        await states.save("k", "{}", 1, 5)
    await states.save("k", "{}", 1, 0)
    with pytest.raises(StateConflict, match=r"^k: wrong last sequence: 1$"):
        await states.save("k", "{}", 2, 0)


async def test_the_causation_lookup_includes_an_event_stored_at_exactly_the_time_given():
    log = InMemoryEventLog()
    log.publish("cc.events.t.s.K", b'{"specversion": "1.0", "type": "t", "x-concordance-stream": "s"}',
                {"Concordance-Causation": "command:1"})
    [found] = await log.caused_by("s", "K", "command:1", log.messages[0].time)
    assert found.seq == 1


async def test_a_message_left_out_of_the_fold_is_logged_with_what_it_is():
    log = InMemoryEventLog()
    log.publish("cc.events.t.s.K", b"not json")
    with capture_logs() as logs:
        assert [e async for e in log.events("s", "K")] == []
    [entry] = logs
    assert entry["event"] == "not an event; left out of the fold" and entry["log_level"] == "error"
    assert (entry["subject"], entry["seq"]) == ("cc.events.t.s.K", 1)
    assert entry["error"].startswith("malformed event")
