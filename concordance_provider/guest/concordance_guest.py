"""Entry point of a component built for wasmCloud's messaging-handler world.

The daemon sends one msgpack envelope per call (see ``concordance_provider/runtime/envelope.py``)
as a NATS request; this module calls the author's unchanged ``WitWorld`` and publishes the answer
to the request's reply subject. Read-model reads and event publishing go back to the daemon
through the envelope's callback subject; read-model writes travel home with the answer.
"""

import importlib

import msgpack
from componentize_py_types import Err
from messaging_world import exports
from messaging_world.imports import consumer
from messaging_world.imports.types import BrokerMessage
from wit_world.imports.types import Event, EventWithState, StatefulCommand

import concordance_guest_session as session
from concordance_guest_target import MODULE

ENVELOPE_VERSION = 1
world = importlib.import_module(MODULE).WitWorld()


def _event(raw: dict) -> Event:
    return Event(event_type=raw["event_type"], stream=raw["stream"], payload=raw["payload"])


def _event_out(event: Event) -> dict:
    return {"event_type": event.event_type, "stream": event.stream, "payload": event.payload}


def _command(args: dict) -> StatefulCommand:
    return StatefulCommand(aggregate=args["aggregate"], command_type=args["command_type"], key=args["key"],
                           state=args["state"], payload=args["payload"])


def _decide(args: dict) -> dict:
    """handle-command, then apply-event of each event on the state it was decided on. A fold that
    fails is not an answer here: the daemon then folds event by event and learns why."""
    events = world.handle_command(_command(args))
    state = args["state"]
    try:
        for event in events:
            state = world.apply_event(EventWithState(event=event, state=state)).state
    except Exception:  # Err or a bug alike
        return {"events": [_event_out(e) for e in events], "folded": False, "state": None}
    return {"events": [_event_out(e) for e in events], "folded": True, "state": state}


def _call(name: str, args: dict) -> object:
    if name == "decide":
        return _decide(args)
    if name == "handle-command":
        return [_event_out(e) for e in world.handle_command(_command(args))]
    if name == "apply-event":
        return {"state": world.apply_event(EventWithState(event=_event(args["event"]), state=args["state"])).state}
    if name == "handle-event":
        ack = world.handle_event(EventWithState(event=_event(args["event"]), state=args["state"]))
        commands = [{"command_type": c.command_type, "aggregate_stream": c.aggregate_stream,
                     "aggregate_key": c.aggregate_key, "json_payload": c.json_payload} for c in ack.commands]
        return {"state": ack.state, "commands": commands}
    if name == "ping":  # the daemon asks whether the component is here at all
        return None
    if name == "apply-stateless-event":
        world.apply_stateless_event(_event(args["event"]))
        return None
    raise ValueError(f"this component has no function {name!r}")


def _answer(request: dict) -> dict:
    if request.get("v") != ENVELOPE_VERSION:
        return {"v": ENVELOPE_VERSION, "fault": f"envelope version {request.get('v')!r} is not {ENVELOPE_VERSION}"}
    session.begin(request.get("callback"), request.get("timeout_ms", 5000))
    try:
        value = _call(request["call"], request["args"])
    except Err as err:
        return {"v": ENVELOPE_VERSION, "err": str(err.value)}
    except Exception as exc:  # a bug in the component: a fault, as a trap would be in-process
        return {"v": ENVELOPE_VERSION, "fault": f"{type(exc).__name__}: {exc}"}
    return {"v": ENVELOPE_VERSION, "ok": value, "puts": session.writes()}


class Handler(exports.Handler):
    def handle_message(self, msg: BrokerMessage) -> None:
        if msg.reply_to is None:
            raise Err("a Concordance call needs a reply subject")
        try:
            answer = _answer(msgpack.unpackb(msg.body))
        except Exception as exc:
            answer = {"v": ENVELOPE_VERSION, "fault": f"unreadable envelope: {exc}"}
        consumer.publish(BrokerMessage(subject=msg.reply_to, body=msgpack.packb(answer), reply_to=None))
