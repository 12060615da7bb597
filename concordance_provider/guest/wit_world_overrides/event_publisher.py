"""event-publisher, served over the daemon callback in the messaging-handler world."""

from componentize_py_types import Err

import concordance_guest_session as session

from . import types


def publish(key: str, event: types.Event) -> None:
    answer = session.ask({"op": "publish", "key": key, "event": {
        "event_type": event.event_type, "stream": event.stream, "payload": event.payload}})
    if answer.get("error"):
        raise Err(answer["error"])
