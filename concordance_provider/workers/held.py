"""The commands this process holds: fetched and not yet finished, across overlapping batches.

The command consumer fetches its next batch while the last one is still being decided, so that a
batch's slowest key does not hold back every command behind it. A command of one key in the later
batch then follows the commands of its key held here from earlier batches: it is decided once
every earlier one of them has finished settled, and goes back to the server, undecided, if one
did not (it went back to the queue, or was left unsettled), as the rest of a key does within a batch.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Hashable, Mapping


class HeldCommands:
    """Held commands by stream sequence; ``on_unsettled`` is told when a keyed one finishes unsettled."""

    def __init__(self, on_unsettled: Callable[[], None]) -> None:
        self._held: dict[int, tuple[Hashable | None, asyncio.Future[bool]]] = {}
        self._on_unsettled = on_unsettled

    def hold(self, seq: int, key: Hashable | None) -> None:
        if seq not in self._held:  # a second copy of one held waits for the first (copy_settled)
            self._held[seq] = (key, asyncio.get_running_loop().create_future())

    def snapshot(self) -> "HeldSnapshot":
        """The commands held now, taken before a batch is held: what its order check counts as its
        own. The batch follows exactly these, even those that finish before its turn comes."""
        return HeldSnapshot(dict(self._held))

    def finish(self, seq: int, settled: bool) -> None:
        held = self._held.pop(seq, None)
        if held is None:
            return
        key, done = held
        done.set_result(settled)
        if not settled and key is not None:
            self._on_unsettled()


class HeldSnapshot:
    """Commands held at one moment, by sequence, with how each finishes."""

    def __init__(self, held: Mapping[int, tuple[Hashable | None, asyncio.Future[bool]]]) -> None:
        self._held = held

    def __contains__(self, seq: object) -> bool:
        return seq in self._held

    def keys(self) -> Mapping[int, Hashable | None]:
        """The key of each, by sequence."""
        return {seq: key for seq, (key, _) in self._held.items()}

    async def copy_settled(self, seq: int) -> bool | None:
        """For a command held already (a second delivery of it, after a NATS restart lost the
        server's record of the first): wait for the first to finish; whether it settled. None if
        ``seq`` is not held."""
        held = self._held.get(seq)
        return None if held is None else await held[1]

    async def earlier_settled(self, seq: int, key: Hashable | None) -> bool:
        """Wait for those of ``key`` before ``seq`` to finish; whether all of them were settled."""
        if key is None:
            return True
        earlier = [done for other, (other_key, done) in self._held.items() if other < seq and other_key == key]
        return all(await asyncio.gather(*earlier)) if earlier else True
