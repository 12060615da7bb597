"""A misbehaving aggregate, written against interface/ alone: it spins, traps, or counts.

Commands: `spin` loops forever; `crash` raises (a trap); `hog` allocates without bound;
`count` emits `counted`; `unfoldable` emits an event its own fold refuses; `busy` works for {"seconds": n} first; `bad_type`, `bad_payload` and `wrong_stream` emit malformed events; `probe` tries to reach outside its sandbox (a file, a socket, the
environment) and reports what happened in a `probed` event. State is {"count": n}.
"""

import json
import os
import socket
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Event, EventWithState, StateAck, StatefulCommand


def _attempt(action) -> str:
    try:
        action()
        return "allowed"
    except Exception as exc:
        return f"refused: {type(exc).__name__}: {exc}"


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
        if command.command_type == "probe":
            target = json.loads(command.payload)
            report = {"file": _attempt(lambda: open(target["file"]).read()),
                      "socket": _attempt(lambda: socket.create_connection(("127.0.0.1", target["port"]), 2)),
                      "env": dict(os.environ)}
            return [Event(event_type="probed", stream="looper", payload=json.dumps(report))]
        if command.command_type == "bad_type":
            return [Event(event_type="a.b", stream="looper", payload="{}")]
        if command.command_type == "bad_payload":
            return [Event(event_type="counted", stream="looper", payload="not json")]
        if command.command_type == "wrong_stream":
            return [Event(event_type="counted", stream="bankaccount", payload="{}")]
        if command.command_type == "busy":
            started = time.monotonic()
            while time.monotonic() - started < json.loads(command.payload)["seconds"]:
                pass
            return [Event(event_type="counted", stream="looper", payload="{}")]
        if command.command_type == "huge":
            return [Event(event_type="counted", stream="looper", payload=json.dumps({"blob": "x" * 2_000_000}))]
        if command.command_type == "unfoldable":
            return [Event(event_type="unfoldable", stream="looper", payload="{}")]
        if command.command_type == "count":
            return [Event(event_type="counted", stream="looper", payload="{}")]
        raise Err(f"unknown command {command.command_type}")

    def apply_event(self, event: EventWithState) -> StateAck:
        if event.event.event_type == "unfoldable":
            raise Err("this event cannot be folded")
        state = json.loads(event.state) if event.state else {"count": 0}
        state["count"] += 1
        return StateAck(state=json.dumps(state))
