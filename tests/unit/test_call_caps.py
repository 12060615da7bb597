import pytest

from concordance_provider.runtime import Event, HandlerEffects
from concordance_provider.runtime.call_caps import CallBudget, CallCaps, OverCap, check_effects

CAPS = CallCaps(value_bytes=10, write_bytes=25, write_keys=3, events=2, event_bytes=10, publish_bytes=15)


def _effects() -> HandlerEffects:
    return HandlerEffects(read=lambda key: None, check_publish=lambda key, event: None)


def test_writes_within_the_caps_are_kept_and_an_overwrite_counts_once():
    effects = _effects()
    budget = CallBudget(effects, CAPS)
    for key in ("a", "b"):
        budget.put(key, "x" * 10)
    budget.put("a", "y" * 5)  # replaces: 15 bytes held, not 25
    budget.put("c", None)  # a deletion counts as a key, not as bytes
    assert effects.puts == {"a": "yyyyy", "b": "x" * 10, "c": None}
    assert budget.write_bytes == 15


def test_a_value_over_its_cap_is_refused_naming_the_key_and_kept_nowhere():
    effects = _effects()
    with pytest.raises(OverCap, match=r"read-model value for key 'k' is over the cap of 10 bytes per value"):
        CallBudget(effects, CAPS).put("k", "x" * 11)
    assert effects.puts == {}


def test_a_value_is_measured_in_utf8_bytes():
    with pytest.raises(OverCap):
        CallBudget(_effects(), CAPS).put("k", "é" * 6)  # 6 characters, 12 bytes


def test_too_many_bytes_or_keys_in_one_call_are_refused():
    budget = CallBudget(_effects(), CAPS)
    budget.put("a", "x" * 10)
    budget.put("b", "x" * 10)
    with pytest.raises(OverCap, match="brings this call's writes to 30 bytes, over the cap of 25"):
        budget.put("c", "x" * 10)
    budget.put("c", "x")
    with pytest.raises(OverCap, match="key 'd' is over the cap of 3 keys per call"):
        budget.put("d", "")
    budget.put("a", "")  # a key already written may be written again


def test_published_events_are_capped_in_count_size_and_total():
    event = Event("evt", "s", "x" * 8)
    effects = _effects()
    budget = CallBudget(effects, CAPS)
    budget.publish("k1", event)
    effects.published.append(("k1", event))
    with pytest.raises(OverCap, match="brings this call's events to 16 bytes, over the cap of 15"):
        budget.publish("k2", event)
    with pytest.raises(OverCap, match="payload over the cap of 10 bytes"):
        budget.publish("k2", Event("evt", "s", "x" * 11))
    budget.publish("k2", Event("evt", "s", "x"))
    effects.published.append(("k2", Event("evt", "s", "x")))
    with pytest.raises(OverCap, match="event 'evt' for key 'k3' is over the cap of 2 events published per call"):
        budget.publish("k3", Event("evt", "s", ""))


def test_effects_handed_over_after_the_call_are_held_to_the_same_caps():
    effects = _effects()
    effects.puts.update({"a": "x" * 10, "b": "x" * 10})
    check_effects(effects, CAPS)
    effects.puts["c"] = "x" * 10
    with pytest.raises(OverCap, match="key 'c'"):
        check_effects(effects, CAPS)
    too_many = _effects()
    too_many.published.extend([("k", Event("evt", "s", ""))] * 3)
    with pytest.raises(OverCap, match="over the cap of 2 events"):
        check_effects(too_many, CAPS)
