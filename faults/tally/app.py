"""An aggregate whose commands emit several events: `add` with {"items": [n, ...]} appends one
`item_added` per item, so a partial append would show as a wrong count. State: count and total."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Event, EventWithState, StateAck, StatefulCommand


class WitWorld(wit_world.WitWorld):
    def handle_command(self, command: StatefulCommand) -> list[Event]:
        items = json.loads(command.payload).get("items")
        if command.command_type != "add" or not isinstance(items, list) or not items:
            raise Err("expected add with a non-empty list of items")
        return [Event(event_type="item_added", stream="tally", payload=json.dumps({"key": command.key, "value": v}))
                for v in items]

    def apply_event(self, event: EventWithState) -> StateAck:
        state = json.loads(event.state) if event.state else {"count": 0, "total": 0}
        state["count"] += 1
        state["total"] += json.loads(event.event.payload)["value"]
        return StateAck(state=json.dumps(state))
