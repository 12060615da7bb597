"""A misbehaving aggregate, written against interface/ alone: it spins, traps, or counts.

Commands: `spin` loops forever; `crash` raises (a trap); `hog` allocates without bound;
`count` emits `counted`; `unfoldable` emits an event its own fold refuses; `busy` works for
{"seconds": n} first, and `nap` sleeps that long (time passes, no CPU is used, as when the
process waits for a core); `bad_type`, `bad_payload` and `wrong_stream` emit malformed events; `probe`
tries to reach outside its sandbox (read a file, connect a raw TCP socket to a numeric address,
read the environment) and reports what happened in a `probed` event. State is {"count": n}.
"""

import errno
import json
import os
import socket
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Event, EventWithState, StateAck, StatefulCommand


def _attempt(action) -> dict:
    """What one reach outside the sandbox gave: its result, or the exact error it raised."""
    step = {}
    try:
        return {"outcome": "allowed", "result": action(step)}
    except OSError as exc:
        return {"outcome": "refused", **step, "type": type(exc).__name__, "errno": exc.errno,
                "errno_name": errno.errorcode.get(exc.errno), "message": str(exc)}
    except Exception as exc:  # anything else means the probe never got as far as the sandbox
        return {"outcome": "failed", **step, "type": type(exc).__name__, "message": str(exc)}


def _read(path: str, step: dict) -> str:
    step["at"] = "open"
    with open(path) as file:
        step["at"] = "read"
        return file.read()


def _connect(host: str, port: int, step: dict) -> str:
    """A raw socket to a numeric address: no name resolution, nothing but the connect itself."""
    step["at"] = "socket"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        step["at"] = "connect"
        sock.connect((host, port))
        return f"connected to {host}:{port}"
    finally:
        sock.close()


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
            report = {"file": _attempt(lambda step: _read(target["file"], step)),
                      "socket": _attempt(lambda step: _connect(target["host"], target["port"], step)),
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
        if command.command_type == "nap":
            time.sleep(json.loads(command.payload)["seconds"])
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
