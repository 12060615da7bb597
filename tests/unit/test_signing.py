"""Signed events and state: the key file, the signatures, an event's place in its instance's log,
and the engine on the in-memory stores with and without a key."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import pytest
from fakes.bank import STREAM, balance
from fakes.engine import NAME, Engine, command

from concordance_provider.engine.mapper import from_message
from concordance_provider.engine.memory import InMemoryStateStore
from concordance_provider.naming import aggregate_state_key
from concordance_provider.signing import (
    REPLAY_WINDOW,
    SIGNATURE,
    Chain,
    Forged,
    Position,
    Signer,
    SigningKeyError,
)
from concordance_provider.store.jetstream import StoredMessage
from concordance_provider.workers.base import Poison, event_of

KEY_BYTES = b"k" * 32
SIGNER = Signer(KEY_BYTES)
STATE_KEY = aggregate_state_key(NAME, "A")
SUBJECT = f"cc.events.funds_deposited.{STREAM}.A"
DATA = b'{"amount": 5}'


# -- the key file --------------------------------------------------------------------------------

def _key_file(tmp_path, content: bytes, mode: int = 0o600):
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_a_private_key_file_of_32_bytes_is_used_without_its_final_newline(tmp_path):
    signer = Signer.from_file(_key_file(tmp_path, KEY_BYTES + b"\n"))
    signature = signer.sign_event(SUBJECT, "m1", "command:1", DATA)
    SIGNER.verify_event(SUBJECT, "m1", "command:1", DATA, signature)  # the same key as without the newline


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_file_others_may_read_is_refused(tmp_path, mode):
    with pytest.raises(SigningKeyError, match=f"may be read by others \\(mode 0{mode:o}\\); make it private: chmod 600"):
        Signer.from_file(_key_file(tmp_path, KEY_BYTES, mode))


def test_a_short_key_is_refused_with_how_to_make_one(tmp_path):
    with pytest.raises(SigningKeyError, match="holds 31 bytes; a key needs at least 32 .*openssl rand"):
        Signer.from_file(_key_file(tmp_path, b"k" * 31 + b"\n"))


def test_a_missing_key_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(SigningKeyError, match="cannot read signing key file .*No such file"):
        Signer.from_file(tmp_path / "absent")
    with pytest.raises(SigningKeyError, match="is not a regular file"):
        Signer.from_file(tmp_path)


# -- signatures ----------------------------------------------------------------------------------

def test_an_event_signature_holds_for_exactly_what_was_signed():
    signature = SIGNER.sign_event(SUBJECT, "m1", "command:1", DATA, Position(7, 1))
    seal = SIGNER.verify_event(SUBJECT, "m1", "command:1", DATA, signature)
    assert seal.position == Position(7, 1)
    assert abs(datetime.now(timezone.utc) - seal.made_at) < timedelta(seconds=5)
    changed = {
        "subject": (SUBJECT.replace(".A", ".B"), "m1", "command:1", DATA, signature),
        "message id": (SUBJECT, "m2", "command:1", DATA, signature),
        "causation": (SUBJECT, "m1", "command:2", DATA, signature),
        "data": (SUBJECT, "m1", "command:1", b'{"amount": 500}', signature),
        "position": (SUBJECT, "m1", "command:1", DATA, signature.replace("prev=7", "prev=9")),
        "time": (SUBJECT, "m1", "command:1", DATA, signature.replace("at=", "at=1")),
    }
    for what, args in changed.items():
        with pytest.raises(Forged, match="does not verify"):
            SIGNER.verify_event(*args)
            pytest.fail(f"a changed {what} verified")
    with pytest.raises(Forged, match="does not verify"):
        Signer(b"x" * 32).verify_event(SUBJECT, "m1", "command:1", DATA, signature)


@pytest.mark.parametrize("signature, message_id, error", [
    (None, "m1", "event is not signed"),
    ("at=1;mac=x", None, "has no message id"),
    ("garbage", "m1", "malformed"),
    ("prev=1;at=2", "m1", "has no mac"),
    ("prev=x;index=0;at=2;mac=y", "m1", "malformed"),
])
def test_an_unsigned_or_malformed_signature_is_a_forgery(signature, message_id, error):
    with pytest.raises(Forged, match=error):
        SIGNER.verify_event(SUBJECT, message_id, "command:1", DATA, signature)


def test_a_state_signature_binds_the_value_to_its_key_and_event_sequence():
    signature = SIGNER.sign_state(STATE_KEY, '{"balance": 1}', 4)
    assert SIGNER.state_is_genuine(STATE_KEY, '{"balance": 1}', 4, signature)
    assert not SIGNER.state_is_genuine(aggregate_state_key(NAME, "B"), '{"balance": 1}', 4, signature)
    assert not SIGNER.state_is_genuine(STATE_KEY, '{"balance": 1}', 5, signature)
    assert not SIGNER.state_is_genuine(STATE_KEY, '{"balance": 9}', 4, signature)
    assert not SIGNER.state_is_genuine(STATE_KEY, None, 4, signature)
    assert not SIGNER.state_is_genuine(STATE_KEY, '{"balance": 1}', 4, None)
    assert SIGNER.state_is_genuine(STATE_KEY, None, 4, SIGNER.sign_state(STATE_KEY, None, 4))


# -- an event's place --------------------------------------------------------------------------

def test_events_stand_where_their_appends_expected_whatever_lies_between():
    chain = Chain()
    assert chain.admits(1, Position(0, 0))
    assert chain.admits(2, Position(1, 0))
    assert chain.admits(4, Position(3, 0))  # 3: a forged message the append found last
    assert chain.admits(5, Position(4, 0))


def test_a_genuine_event_stored_again_later_is_out_of_place():
    chain = Chain()
    assert chain.admits(1, Position(0, 0))
    assert chain.admits(2, Position(1, 0))
    assert not chain.admits(3, Position(1, 0))  # a copy of 2
    assert not chain.admits(4, Position(0, 0))  # a copy of 1
    assert chain.admits(5, Position(4, 0))  # the next genuine event: after the copies
    assert not chain.admits(6, None)  # not an aggregate's event


def test_the_events_of_one_append_follow_each_other():
    chain = Chain()
    assert chain.admits(3, Position(0, 0))
    assert chain.admits(4, Position(0, 1))
    assert chain.admits(5, Position(0, 2))
    assert not chain.admits(9, Position(0, 1))  # the second event of that append, stored again
    assert not Chain().admits(4, Position(0, 1))  # the second without the first


def test_a_read_after_a_states_sequence_admits_only_what_was_appended_after_it():
    assert Chain(after_seq=5).admits(6, Position(5, 0))
    assert not Chain(after_seq=5).admits(9, Position(3, 0))  # appended expecting 3: a copy


# -- consumers ----------------------------------------------------------------------------------

def _stored(engine: Engine, seq: int, stored_at: datetime | None = None) -> StoredMessage:
    found = engine.log.messages[seq - 1]
    return StoredMessage(found.seq, found.subject, found.headers, found.data,
                         (stored_at or found.time).isoformat())


async def test_a_consumer_dead_letters_a_forged_event_and_a_copy_stored_too_late(signed_engine):
    genuine = _stored(signed_engine, 2)
    assert event_of(2, genuine, SIGNER).cloud_event.data == {"amount": 1}
    forged = signed_engine.append_directly("A", "funds_deposited", "command:2", amount=1_000_000)
    with pytest.raises(Poison, match="forged event: event is not signed"):
        event_of(forged, _stored(signed_engine, forged), SIGNER)
    late = _stored(signed_engine, 2, signed_engine.log.messages[1].time + REPLAY_WINDOW + timedelta(seconds=1))
    with pytest.raises(Poison, match="forged event: a copy of an event made at"):
        event_of(2, late, SIGNER)
    assert event_of(forged, _stored(signed_engine, forged), None).cloud_event.data == {"amount": 1_000_000}


# -- the engine ---------------------------------------------------------------------------------

@pytest.fixture
async def signed_engine() -> Engine:
    """Account A opened with 100 and given 1, with a key: two events, state saved after the second."""
    engine = Engine.signed(SIGNER)
    await engine.processor.process(command("open", balance=100))
    await engine.processor.process(command("deposit", amount=1))
    return engine


async def _withdraw(engine: Engine, amount: int) -> str | None:
    return (await engine.processor.process(command("withdraw", amount=amount))).error


async def test_a_forged_event_is_never_folded(signed_engine):
    signed_engine.append_directly("A", "funds_deposited", "command:99", amount=1_000_000)
    copied = dict(signed_engine.log.messages[1].headers)  # a genuine event's signature, on other data
    signed_engine.log.publish(SUBJECT, json.dumps(json.loads(signed_engine.log.messages[1].data) | {
        "data": {"amount": 1_000_000}}).encode(), copied)
    fresh = signed_engine.twin()
    assert await fresh.repository.rebuild("A") == json.dumps({"balance": 101})
    assert await _withdraw(fresh, 500) == "insufficient funds: 500 requested, 101 available"
    assert await _withdraw(fresh, 100) is None
    assert await fresh.state() == (1, 5)
    withdrawn = fresh.log.messages[-1]
    assert SIGNER.verify_event(withdrawn.subject, withdrawn.headers["Nats-Msg-Id"], withdrawn.headers[
        "Concordance-Causation"], withdrawn.data, withdrawn.headers[SIGNATURE]).position == Position(4, 0)


async def test_a_genuine_event_published_again_is_never_folded_again(signed_engine):
    deposit = signed_engine.log.messages[1]
    signed_engine.log.publish(deposit.subject, deposit.data, deposit.headers)  # the log keeps it: no dedup here
    assert await signed_engine.twin().repository.rebuild("A") == json.dumps({"balance": 101})
    await signed_engine.twin().processor.process(command("deposit", amount=10))
    assert await signed_engine.twin().repository.rebuild("A") == json.dumps({"balance": 111})


async def test_the_events_of_one_append_are_all_folded_and_a_copy_of_one_is_not(signed_engine):
    await signed_engine.processor.process(command("transfer_in", amount=5))
    second = signed_engine.log.messages[-1]
    signed_engine.log.publish(second.subject, second.data, second.headers)
    assert await signed_engine.twin().repository.rebuild("A") == json.dumps({"balance": 111})


async def test_a_forged_state_is_ignored_and_folded_again_from_the_log(signed_engine):
    signed_engine.states.write(STATE_KEY, json.dumps({"balance": 5_000_000}), event_seq=2)
    fresh = signed_engine.twin()
    assert balance((await fresh.repository.current("A")).value) == 101
    assert await _withdraw(fresh, 1000) == "insufficient funds: 1000 requested, 101 available"
    assert await fresh.state() == (101, 2)  # the rejection saved the true state over the forged one
    assert SIGNATURE in fresh.states._entries[STATE_KEY][1]


async def test_a_genuine_state_moved_to_another_key_or_sequence_is_ignored(signed_engine):
    await signed_engine.processor.process(command("open", key="B", balance=7))
    genuine_a, headers = signed_engine.states._entries[STATE_KEY]
    signed_engine.states.write(aggregate_state_key(NAME, "B"), genuine_a.value, genuine_a.event_seq, headers)
    assert await signed_engine.twin().state("B") == (None, 0)  # read as no state: folded again
    assert balance((await signed_engine.twin().repository.current("B")).value) == 7
    signed_engine.states.write(STATE_KEY, genuine_a.value, 1, headers)
    assert (await signed_engine.states.load(STATE_KEY)).event_seq == 0
    assert balance((await signed_engine.twin().repository.current("A")).value) == 101


async def test_a_state_the_store_cannot_verify_keeps_its_revision_for_the_next_write():
    states = InMemoryStateStore(signer=SIGNER)
    revision = states.write(STATE_KEY, "forged", 9)
    loaded = await states.load(STATE_KEY)
    assert (loaded.value, loaded.event_seq, loaded.revision) == (None, 0, revision)
    await states.save(STATE_KEY, "true", 3, loaded.revision)
    assert (await states.load(STATE_KEY)).value == "true"


async def test_without_a_key_anyone_who_may_publish_can_forge():
    engine = Engine()
    await engine.processor.process(command("open", balance=100))
    engine.append_directly("A", "funds_deposited", "command:99", amount=1_000_000)
    assert balance((await engine.twin().repository.current("A")).value) == 1_000_100
    assert SIGNATURE not in engine.log.messages[0].headers


async def test_events_of_a_signed_log_are_signed_with_their_place():
    engine = Engine.signed(SIGNER)
    await engine.processor.process(command("open", balance=100))
    await engine.processor.process(command("transfer_in", amount=1))
    positions = [from_message(m.seq, m.subject, m.headers, m.data, SIGNER).position for m in engine.log.messages]
    assert positions == [Position(0, 0), Position(1, 0), Position(1, 1)]
