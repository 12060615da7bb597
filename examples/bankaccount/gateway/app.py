"""The other bank, played by a gateway: it answers every wire transfer it is told about.

Rule: the other bank accepts a transfer when the target routing number is nine digits and the
amount is at most 10000; otherwise it refuses it. The answer is the event
wire_transfer_succeeded or wire_transfer_failed on the stream `interbank`, keyed by the wire
transfer id.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import event_publisher
from wit_world.imports.types import Event

MAX_TRANSFER = 10000
STREAM = "interbank"


def answer(data: dict) -> tuple[str, str]:
    routing = str(data.get("targetRoutingNumber", ""))
    if not (len(routing) == 9 and routing.isdigit()):
        return "wire_transfer_failed", f"unknown routing number {routing!r}"
    if data["amount"] > MAX_TRANSFER:
        return "wire_transfer_failed", f"amount over the per-transfer limit of {MAX_TRANSFER}"
    return "wire_transfer_succeeded", "accepted by the receiving bank"


class WitWorld(wit_world.WitWorld):
    def apply_stateless_event(self, event: Event) -> None:
        if event.event_type != "wire_transfer_initiated":
            return
        data = json.loads(event.payload)
        event_type, note = answer(data)
        payload = {key: data[key] for key in ("accountNumber", "amount", "customerId", "wireTransferId",
                                              "targetRoutingNumber", "targetAccountNumber")}
        payload["note"] = note
        event_publisher.publish(data["wireTransferId"],
                                Event(event_type=event_type, stream=STREAM, payload=json.dumps(payload)))
