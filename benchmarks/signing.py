"""What a signing key costs per command, measured without a server.

* the signatures alone: signing and verifying a typical bank event (a ``funds_deposited``
  CloudEvent) and a typical account state record, each ``--times`` times;
* the engine on the in-memory stores (``tests/fakes``), without and with a key in turn: deposits
  over a few accounts, and the fold of one account's whole history (every event verified and
  checked for its place).

Per command the daemon signs one event and one state record, and verifies the event once in its
aggregate's event consumer and once in each projector, notifier or process manager that handles it.

Run: ``.venv/bin/python -m benchmarks.signing [--times N --commands N --rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fakes.engine import Engine, command  # noqa: E402

from concordance_provider.engine.mapper import to_message  # noqa: E402
from concordance_provider.signing import Position, Signer  # noqa: E402
from concordance_provider.wire import new_event  # noqa: E402

SIGNER = Signer(secrets.token_bytes(32))
STATE = json.dumps({"accountNumber": "ABC123", "customerId": "CUSTBOB", "balance": 6000, "minBalance": 100,
                    "reservedFunds": {}})


def _per_call_us(call: Callable[[], object], times: int) -> float:
    started = time.perf_counter()
    for _ in range(times):
        call()
    return (time.perf_counter() - started) / times * 1e6


def signatures(times: int) -> dict[str, float]:
    event = new_event("funds_deposited", "bankaccount", "ABC123", json.dumps(
        {"accountNumber": "ABC123", "amount": 3000, "note": "salary", "customerId": "CUSTBOB"}))
    message = to_message(event, "ABC123", "command:42", "command:42:0", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    signature = SIGNER.sign_event(message.subject, "command:42:0", "command:42", message.data, Position(41, 0))
    state_signature = SIGNER.sign_state("agg.bankaccount.ABC123", STATE, 42)
    print(f"event: {len(message.data)} bytes; state: {len(STATE)} bytes; signature header: {len(signature)} bytes")
    return {
        "sign event": _per_call_us(lambda: SIGNER.sign_event(message.subject, "command:42:0", "command:42",
                                                             message.data, Position(41, 0)), times),
        "verify event": _per_call_us(lambda: SIGNER.verify_event(message.subject, "command:42:0", "command:42",
                                                                 message.data, signature), times),
        "sign state": _per_call_us(lambda: SIGNER.sign_state("agg.bankaccount.ABC123", STATE, 42), times),
        "verify state": _per_call_us(lambda: SIGNER.state_is_genuine("agg.bankaccount.ABC123", STATE, 42,
                                                                     state_signature), times),
    }


async def _deposits(engine: Engine, commands: int, keys: int) -> float:
    """Microseconds per deposit, decided, appended, folded and saved, after each account is opened."""
    for index in range(keys):
        await engine.processor.process(command("open", f"K{index}", balance=0))
    started = time.perf_counter()
    for index in range(commands):
        await engine.processor.process(command("deposit", f"K{index % keys}", amount=1))
    return (time.perf_counter() - started) / commands * 1e6


async def _fold(engine: Engine, events: int) -> float:
    """Microseconds per event of a rebuild from the whole log of one account."""
    await engine.processor.process(command("open", "F", balance=0))
    for _ in range(events - 1):
        await engine.processor.process(command("deposit", "F", amount=1))
    started = time.perf_counter()
    await engine.repository.rebuild("F")
    return (time.perf_counter() - started) / events * 1e6


async def engine_ab(rounds: int, run: Callable[[Engine], Awaitable[float]]) -> tuple[list[float], list[float]]:
    without: list[float] = []
    with_key: list[float] = []
    for index in range(rounds):  # in turn, each first every other round, so the machine's other work falls on both
        order = [(without, Engine()), (with_key, Engine.signed(SIGNER))]
        for found, engine in order if index % 2 == 0 else reversed(order):
            found.append(await run(engine))
    return without, with_key


def _report(name: str, without: list[float], with_key: list[float]) -> None:
    a, b = statistics.median(without), statistics.median(with_key)
    print(f"{name}: without a key {a:.1f} µs, with {b:.1f} µs (median of {len(without)}; "
          f"+{b - a:.1f} µs, {100 * (b - a) / a:+.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=20_000, help="signatures made and checked of each kind")
    parser.add_argument("--commands", type=int, default=2_000, help="deposits per round of the engine A/B")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, micros in signatures(args.times).items():
        print(f"{name}: {micros:.2f} µs")
    _report("engine, per deposit", *asyncio.run(engine_ab(args.rounds, lambda e: _deposits(e, args.commands, 20))))
    _report("engine, per event folded", *asyncio.run(engine_ab(args.rounds, lambda e: _fold(e, args.commands))))


if __name__ == "__main__":
    main()
