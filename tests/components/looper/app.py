"""A misbehaving aggregate, written against interface/ alone: it spins, traps, or counts.

Commands: `spin` loops forever; `crash` raises (a trap); `hog` allocates without bound;
`count` emits `counted`. State is {"count": n}.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Event, EventWithState, StateAck, StatefulCommand


class WitWorld(wit_world.WitWorld):
    def handle_command(self, command: StatefulCommand) -> list[Event]:
        if command.command_type == "spin":
            while True:
                pass
        if command.command_type == "crash":
            raise RuntimeError("deliberate crash")
        if command.command_type == "hog":
            hoard = []
            while True:
                hoard.append(bytearray(1024 * 1024))
        if command.command_type == "count":
            return [Event(event_type="counted", stream="looper", payload="{}")]
        raise Err(f"unknown command {command.command_type}")

    def apply_event(self, event: EventWithState) -> StateAck:
        state = json.loads(event.state) if event.state else {"count": 0}
        state["count"] += 1
        return StateAck(state=json.dumps(state))
