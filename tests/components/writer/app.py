"""A projector that writes whatever read-model keys an event names: on every event it puts the
event's payload under each key of the payload's `keys` list, without reading anything first."""

import json

import wit_world
from wit_world.imports import read_model
from wit_world.imports.types import Event


class WitWorld(wit_world.WitWorld):
    def apply_stateless_event(self, event: Event) -> None:
        for key in json.loads(event.payload)["keys"]:
            read_model.put(key, event.payload)
