"""The command processor's rules, on the in-memory stores and a Python bank: no server, no wasm."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from structlog.testing import capture_logs
from fakes.bank import STREAM, FakeBank
from fakes.engine import NAME, Engine, command

from concordance_provider import failpoints
from concordance_provider.engine.mapper import CAUSATION
from concordance_provider.engine.memory import InMemoryEventLog
from concordance_provider.engine.processor import MAX_CONFLICT_RETRIES, Command
from concordance_provider.failpoints import FailpointError
from concordance_provider.runtime import ComponentFailed, Event

@pytest.fixture
def engine() -> Engine:
    return Engine()


@pytest.fixture
def disarm_failpoints():
    yield
    failpoints.configure(None)


async def test_accepted_command_appends_its_events_and_saves_the_state_after_them(engine):
    opened = await engine.processor.process(command("open", balance=100))
    deposit = command("deposit", amount=5)
    result = await engine.processor.process(deposit)

    assert opened.status == "accepted" and opened.events == ["account_opened"]
    assert result.model_dump(exclude_none=True) == {
        "status": "accepted", "aggregate": NAME, "command_type": "deposit", "key": "A", "events": ["funds_deposited"]}
    events = await engine.events()
    assert [e.event_type for e in events] == ["account_opened", "funds_deposited"]
    assert events[-1].causation == deposit.causation
    assert events[-1].cloud_event.subject == "A"
    assert await engine.state() == (105, events[-1].seq)
    assert engine.bank.asked == [(NAME, "A"), (NAME, "A")]
    assert engine.states.writes == 2  # one state write per command


async def test_rejection_by_the_component_is_a_result_and_stores_nothing(engine):
    await engine.processor.process(command("open", balance=10))
    result = await engine.processor.process(command("withdraw", amount=11))

    assert result.status == "rejected"
    assert result.error == "insufficient funds: 11 requested, 10 available"
    assert result.command_type == "withdraw" and result.key == "A" and result.events == []
    assert len(await engine.events()) == 1
    assert (await engine.state())[0] == 10


async def test_command_without_events_is_accepted_and_writes_nothing(engine):
    await engine.processor.process(command("open"))
    writes = engine.states.writes
    result = await engine.processor.process(command("noop"))
    assert result.status == "accepted" and result.events == []
    assert len(await engine.events()) == 1 and engine.states.writes == writes


async def test_several_events_are_appended_together_and_all_folded(engine):
    await engine.processor.process(command("open", balance=1))
    result = await engine.processor.process(command("transfer_in", amount=10))
    assert result.events == ["funds_deposited", "funds_deposited"]
    events = await engine.events()
    assert [e.seq for e in events] == [1, 2, 3]
    assert await engine.state() == (21, 3)


# -- one writer wins ---------------------------------------------------------------------------------

async def test_a_concurrent_append_makes_the_command_decided_again_on_newer_state(engine):
    other = engine.twin()
    await engine.processor.process(command("open", balance=100))
    await engine.processor.process(command("deposit", amount=0))  # engine now holds A in its cache

    async def another_daemon_withdraws() -> None:
        engine.bank.before_decide = None
        assert (await other.processor.process(command("withdraw", amount=60))).status == "accepted"

    engine.bank.before_decide = another_daemon_withdraws
    result = await engine.processor.process(command("withdraw", amount=60))

    assert result.status == "rejected"  # decided again on 40, not on the 100 it first saw
    assert result.error == "insufficient funds: 60 requested, 40 available"
    assert engine.bank.decisions == 4  # open, deposit, and the withdrawal twice
    assert [e.event_type for e in await engine.events()].count("funds_withdrawn") == 1
    assert (await engine.state())[0] == 40


async def test_a_conflict_retry_appends_on_top_of_the_other_writers_event(engine):
    other = engine.twin()
    await engine.processor.process(command("open", balance=0))

    async def another_daemon_deposits() -> None:
        engine.bank.before_decide = None
        await other.processor.process(command("deposit", amount=7))

    engine.bank.before_decide = another_daemon_deposits
    result = await engine.processor.process(command("deposit", amount=5))

    assert result.status == "accepted"
    assert [e.seq for e in await engine.events()] == [1, 2, 3]
    assert await engine.state() == (12, 3)


async def test_a_stale_cache_costs_a_retry_never_a_wrong_decision(engine):
    other = engine.twin()
    await engine.processor.process(command("open", balance=100))
    await other.processor.process(command("withdraw", amount=70))  # engine's cache still says 100

    result = await engine.processor.process(command("withdraw", amount=50))

    assert result.status == "rejected" and "30 available" in str(result.error)
    assert (await engine.state())[0] == 30


async def test_gives_up_after_as_many_conflicts_as_allowed(engine):
    await engine.processor.process(command("open"))
    appended = []

    async def someone_always_appends_first() -> None:
        appended.append(engine.append_directly("A", "funds_deposited", "elsewhere", amount=1))

    engine.bank.before_decide = someone_always_appends_first
    with pytest.raises(ComponentFailed, match=f"gave up after {MAX_CONFLICT_RETRIES} concurrent-append conflicts"):
        await engine.processor.process(command("deposit", amount=1))
    assert len(appended) == MAX_CONFLICT_RETRIES
    assert all(e.causation == "elsewhere" for e in (await engine.events())[1:])


# -- no double append ----------------------------------------------------------------------------------

async def test_a_redelivered_command_whose_events_are_stored_is_accepted_without_deciding_again(
        engine, disarm_failpoints):
    await engine.processor.process(command("open", balance=10))
    first = command("transfer_in", amount=5)
    failpoints.configure("aggregate.after_append=error")  # the crash between append and state write
    with pytest.raises(FailpointError):
        await engine.processor.process(first)
    failpoints.configure(None)
    assert (await engine.state())[0] == 10  # appended, state not written
    decisions = engine.bank.decisions

    again = Command(first.raw, first.seq, True, first.stored_at)
    other = engine.twin()
    result = await other.processor.process(again)

    assert result.status == "accepted" and result.events == ["funds_deposited", "funds_deposited"]
    assert len(await engine.events()) == 3  # nothing appended twice
    assert other.bank.decisions == 0 and engine.bank.decisions == decisions
    assert await engine.state() == (20, 3)  # and state caught up


async def test_a_redelivered_command_that_appended_nothing_is_decided(engine):
    await engine.processor.process(command("open", balance=10))
    result = await engine.processor.process(command("deposit", redelivered=True, amount=1))
    assert result.status == "accepted" and (await engine.state())[0] == 11


async def test_the_causation_lookup_only_looks_from_the_commands_store_time_less_the_margin(engine):
    await engine.processor.process(command("open", balance=10))
    seq = 4242
    engine.append_directly("A", "funds_deposited", f"command:{seq}", amount=1)
    much_later = datetime.now(timezone.utc) + timedelta(minutes=5)
    result = await engine.processor.process(command("deposit", seq=seq, redelivered=True, stored_at=much_later,
                                                    amount=3))
    # the lookup did not see the event, so the command was decided; the log refused its message id
    assert result.status == "accepted" and result.events == ["funds_deposited"]
    assert len(await engine.events()) == 2


async def test_a_command_is_never_appended_twice_even_when_the_lookup_misses(engine):
    await engine.processor.process(command("open", balance=10))
    first = command("deposit", amount=1)
    await engine.processor.process(first)
    late = Command(first.raw, first.seq, True, first.stored_at + timedelta(minutes=5))
    result = await engine.processor.process(late)
    assert result.status == "accepted" and result.events == ["funds_deposited"]
    assert len(await engine.events()) == 2 and (await engine.state())[0] == 11


async def test_a_message_id_stored_by_something_else_is_a_fault(engine):
    await engine.processor.process(command("open", balance=10))
    engine.log.publish("cc.events.other.elsewhere.X", b"{}", {"Nats-Msg-Id": "command:77:0"})
    with pytest.raises(ComponentFailed, match="already holds message ids of command:77"):
        await engine.processor.process(command("deposit", seq=77, amount=1))


async def test_a_command_that_is_not_redelivered_does_not_look_for_earlier_events(engine):
    await engine.processor.process(command("open", balance=10))
    engine.append_directly("A", "funds_deposited", "command:99", amount=1)
    fresh = engine.twin()
    # a first delivery is decided; the log then refuses the second message id
    result = await fresh.processor.process(command("deposit", seq=99, amount=2))
    assert fresh.bank.decisions == 1
    assert result.status == "accepted" and len(await engine.events()) == 2
    assert (await engine.state())[0] == 11


# -- what the component returns --------------------------------------------------------------------------

@pytest.mark.parametrize("command_type, message", [
    ("bad_type", "component returned a malformed event: event type 'funds.deposited' is not allowed"),
    ("bad_payload", "component returned a malformed event: event 'funds_deposited' payload is not JSON"),
    ("other_stream", "aggregate 'bank' may only append to its stream 'bank', not 'elsewhere'"),
])
async def test_malformed_events_from_the_component_are_a_fault_and_nothing_is_stored(engine, command_type, message):
    await engine.processor.process(command("open", balance=10))
    with pytest.raises(ComponentFailed, match=message):
        await engine.processor.process(command(command_type))
    assert len(await engine.events()) == 1 and (await engine.state()) == (10, 1)


async def test_an_event_whose_text_cannot_be_stored_is_a_fault():
    engine = Engine()
    await engine.processor.process(command("open"))

    async def lone_surrogate(*_args: object) -> object:
        from concordance_provider.runtime import Decision
        return Decision([Event("note_added", STREAM, '{"note": "\\ud800"}')])

    engine.bank.decide = lone_surrogate  # type: ignore[method-assign]
    with pytest.raises(ComponentFailed, match="cannot be written as JSON"):
        await engine.processor.process(command("note"))


@pytest.mark.parametrize("command_type", ["huge", "huge_second"])
async def test_an_event_too_large_to_store_is_a_fault_and_nothing_is_stored(command_type):
    engine = Engine(log=InMemoryEventLog(max_payload=4096))
    await engine.processor.process(command("open", balance=10))
    with pytest.raises(ComponentFailed, match="component returned an event too large to store"):
        await engine.processor.process(command(command_type, size=5000))
    assert len(await engine.events()) == 1 and (await engine.state()) == (10, 1)


async def test_an_outage_is_neither_a_rejection_nor_a_fault(engine):
    await engine.processor.process(command("open", balance=10))

    async def log_unreachable(*_args: object, **_kwargs: object) -> list[int]:
        raise ConnectionError("no servers available")

    engine.log.append = log_unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await engine.processor.process(command("deposit", amount=1))
    assert engine.repository.cached("A") is None  # what the log holds is unknown: read it again


async def test_a_component_failure_while_folding_is_a_fault_and_nothing_is_stored(engine):
    with pytest.raises(ComponentFailed, match="before the account was opened"):
        await engine.processor.process(command("unchecked_deposit"))
    assert await engine.events() == []


# -- fold what is stored ----------------------------------------------------------------------------------

async def test_the_components_own_fold_is_used_when_its_events_are_exactly_those_stored():
    engine = Engine(bank=FakeBank(fold_in_decide=True))
    await engine.processor.process(command("open", balance=3))
    await engine.processor.process(command("deposit", amount=4))
    assert engine.bank.folds == 0
    assert (await engine.state())[0] == 7


async def test_the_components_own_fold_is_trusted_as_the_state_after_exact_events():
    engine = Engine(bank=FakeBank(fold_in_decide=True))
    engine.bank.folded_state = json.dumps({"balance": 999})
    await engine.processor.process(command("open", balance=3))
    assert (await engine.state())[0] == 999


async def test_the_components_own_fold_is_ignored_when_its_events_differ_from_those_stored():
    bank = FakeBank(fold_in_decide=True)
    engine = Engine(bank=bank)
    await engine.processor.process(command("open", balance=3))
    bank.folded_state = json.dumps({"balance": 999})

    async def camel_case_and_spacing(*_args: object) -> object:
        from concordance_provider.runtime import Decision
        return Decision([Event("FundsDeposited", STREAM, '{"amount":4}')], True, bank.folded_state)

    bank.decide = camel_case_and_spacing  # type: ignore[method-assign]
    await engine.processor.process(command("deposit", amount=4))
    assert bank.folds == 1  # folded here, from the stored form
    assert (await engine.state())[0] == 7
    assert (await engine.events())[-1].event_type == "funds_deposited"


async def test_an_event_without_a_stream_is_the_aggregates_and_folded_from_its_stored_form(engine):
    await engine.processor.process(command("open", balance=1))

    async def no_stream_and_no_finite_number(*_args: object) -> object:
        from concordance_provider.runtime import Decision
        return Decision([Event("funds_deposited", "", '{"amount": 2, "rate": NaN}')], True,
                        json.dumps({"balance": 999}))

    engine.bank.decide = no_stream_and_no_finite_number  # type: ignore[method-assign]
    await engine.processor.process(command("deposit"))
    stored = (await engine.events())[-1]
    assert stored.stream == STREAM and stored.cloud_event.data == {"amount": 2, "rate": None}
    assert (await engine.state())[0] == 3  # the component's fold saw NaN, the log keeps null


async def test_failpoints_sit_between_append_state_and_outcome(engine, disarm_failpoints):
    await engine.processor.process(command("open", balance=1))
    failpoints.configure("aggregate.after_state=error")
    with pytest.raises(FailpointError):
        await engine.processor.process(command("deposit", amount=1))
    assert (await engine.state())[0] == 2  # the state was written before the point


async def test_commands_carry_their_causation():
    assert command("open", seq=12).causation == "command:12"
    assert CAUSATION == "Concordance-Causation"


async def test_a_rejection_on_state_left_behind_stores_the_caught_up_state(engine):
    await engine.processor.process(command("open", balance=10))
    seq = engine.append_directly("A", "funds_deposited", "command:600", amount=5)  # then a crash
    other = engine.twin()
    result = await other.processor.process(command("withdraw", amount=99))
    assert result.status == "rejected" and "15 available" in str(result.error)
    assert await engine.state() == (15, seq)


async def test_a_conflict_is_logged_with_the_aggregate_key_and_command(engine):
    await engine.processor.process(command("open"))

    async def someone_appends_first() -> None:
        engine.bank.before_decide = None
        engine.append_directly("A", "funds_deposited", "elsewhere", amount=1)

    engine.bank.before_decide = someone_appends_first
    deposit = command("deposit", amount=1)
    with capture_logs() as logs:
        await engine.processor.process(deposit)
    assert {"event": "append conflict; deciding again", "aggregate": NAME, "key": "A",
            "command_seq": deposit.seq, "log_level": "debug"} in logs


async def test_commands_of_different_keys_are_decided_concurrently(engine):
    await engine.processor.process(command("open", "A"))
    await engine.processor.process(command("open", "B"))
    release = asyncio.Event()

    async def wait_for_release() -> None:
        engine.bank.before_decide = None
        await release.wait()

    engine.bank.before_decide = wait_for_release
    slow = asyncio.create_task(engine.processor.process(command("deposit", "A", amount=1)))
    while engine.bank.before_decide is not None:  # A is being decided, and holds its key
        await asyncio.sleep(0)
    other = await asyncio.wait_for(engine.processor.process(command("deposit", "B", amount=1)), 1.0)
    assert other.status == "accepted" and not slow.done()
    release.set()
    assert (await slow).status == "accepted"


async def test_an_outage_while_saving_state_forgets_the_cached_state(engine):
    await engine.processor.process(command("open", balance=1))

    async def store_unreachable(*_args: object) -> int:
        raise ConnectionError("no servers available")

    engine.states.save = store_unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await engine.processor.process(command("deposit", amount=1))
    assert engine.repository.cached("A") is None


async def test_a_commands_trace_context_reaches_each_of_its_events_with_a_span_of_their_own(engine):
    from dataclasses import replace

    from concordance_provider.tracing import TRACEPARENT, trace_id
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await engine.processor.process(replace(command("open", balance=0), traceparent=given))
    await engine.processor.process(command("deposit", amount=5))  # no trace context: none invented here

    traced, untraced = engine.log.messages
    assert trace_id(traced.headers[TRACEPARENT]) == trace_id(given)
    assert traced.headers[TRACEPARENT] != given
    assert TRACEPARENT not in untraced.headers


async def test_each_append_conflict_is_counted_for_its_aggregate(engine):
    from prometheus_client import REGISTRY

    def conflicts() -> float:
        return REGISTRY.get_sample_value("concordance_append_conflicts_total", {"aggregate": NAME}) or 0.0

    other = engine.twin()
    await engine.processor.process(command("open", balance=0))
    before = conflicts()

    async def another_daemon_deposits() -> None:
        engine.bank.before_decide = None
        await other.processor.process(command("deposit", amount=7))

    engine.bank.before_decide = another_daemon_deposits
    await engine.processor.process(command("deposit", amount=5))
    assert conflicts() == before + 1
