import pytest
from nats.js.api import StreamConfig, StreamInfo, StreamState

from concordance_provider.store.streams import events_config
from concordance_provider.stream_watch import events_removed


def _info(config: StreamConfig, first: int, last: int, messages: int) -> StreamInfo:
    state = StreamState(messages=messages, bytes=0, first_seq=first, last_seq=last, consumer_count=0)
    return StreamInfo(config=config, state=state)


@pytest.mark.parametrize("first, last, messages, removed", [
    (1, 0, 0, 0),  # empty, never written
    (1, 5, 5, 0),  # all there
    (6, 5, 0, 5),  # purged
    (3, 5, 3, 2),  # the first two deleted
    (1, 5, 4, 1),  # one deleted inside
])
def test_events_removed_from_a_log_without_limits(first, last, messages, removed):
    assert events_removed(_info(events_config(), first, last, messages)) == removed


@pytest.mark.parametrize("limit", [{"max_age": 3600.0}, {"max_msgs": 10}, {"max_bytes": 1 << 20},
                                   {"max_msgs_per_subject": 1}])
def test_a_log_with_limits_removes_events_by_design(limit):
    config = StreamConfig(**{**events_config().as_dict(), **limit})
    assert events_removed(_info(config, 6, 5, 0)) == 0
