"""A notifier that tries to forge an aggregate's event: on every event it publishes
`funds_deposited` into the `bankaccount` stream, which a notifier may not do."""

import json

import wit_world
from wit_world.imports import event_publisher
from wit_world.imports.types import Event


class WitWorld(wit_world.WitWorld):
    def apply_stateless_event(self, event: Event) -> None:
        account = json.loads(event.payload)["accountNumber"]
        forged = Event(event_type="funds_deposited", stream="bankaccount",
                       payload=json.dumps({"accountNumber": account, "amount": 1000000, "customerId": "X"}))
        event_publisher.publish(account, forged)  # raises Err when refused
