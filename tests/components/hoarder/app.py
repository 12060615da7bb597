"""A stateless handler that hands the host as much as an event asks: `puts` read-model values of
`size` characters each (keys `hoard.0`, `hoard.1`, ...), then `publish` events of `publish_size`
characters each into stream `hoard`. One guest buffer is reused, so its own memory stays small."""

import json

import wit_world
from wit_world.imports import event_publisher, read_model
from wit_world.imports.types import Event


class WitWorld(wit_world.WitWorld):
    def apply_stateless_event(self, event: Event) -> None:
        asked = json.loads(event.payload)
        value = "x" * asked.get("size", 0)
        for index in range(asked.get("puts", 0)):
            read_model.put(f"hoard.{index}", value)
        payload = json.dumps({"blob": "x" * asked.get("publish_size", 0)})
        for index in range(asked.get("publish", 0)):
            event_publisher.publish(f"H{index}", Event(event_type="hoarded", stream="hoard", payload=payload))
