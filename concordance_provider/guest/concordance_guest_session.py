"""The current call's read-model overlay and its way back to the daemon (messaging-handler world)."""

import msgpack
from componentize_py_types import Err
from messaging_world.imports import consumer

_callback: str | None = None
_timeout_ms = 5000
_writes: dict[str, str | None] = {}


def begin(callback: str | None, timeout_ms: int) -> None:
    global _callback, _timeout_ms, _writes
    _callback, _timeout_ms, _writes = callback, timeout_ms, {}


def writes() -> dict[str, str | None]:
    return dict(_writes)


def ask(request: dict) -> dict:
    """One request to the daemon for this call; any failure ends the call as a fault."""
    if _callback is None:
        raise RuntimeError("the daemon gave this call no callback subject")
    try:
        reply = consumer.request(_callback, msgpack.packb(request), _timeout_ms)
    except Err as err:
        raise RuntimeError(f"daemon callback failed: {err.value}") from None
    return msgpack.unpackb(reply.body)


def get(key: str) -> str | None:
    if key in _writes:
        return _writes[key]
    answer = ask({"op": "get", "key": key})
    if answer.get("error"):
        raise RuntimeError(answer["error"])
    return answer.get("value")


def put(key: str, value: str | None) -> None:
    _writes[key] = value
