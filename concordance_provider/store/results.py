"""Command outcomes in KV ``CC_RESULTS``, keyed by the command's CC_COMMANDS sequence.

A client that sent a command with request/reply got ``{"stream":"CC_COMMANDS","seq":N}`` back;
``nats kv get CC_RESULTS N`` (or a watch on that key) tells it what became of the command.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from ..naming import RESULTS_BUCKET
from ..wire import CommandResult


class ResultStore:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv = None

    async def record(self, command_seq: int, result: CommandResult) -> None:
        if self._kv is None:
            self._kv = await self._js.key_value(RESULTS_BUCKET)
        await self._kv.put(str(command_seq), result.model_dump_json(exclude_none=True).encode())
