"""A tiny bank as a Python component: the runtime's ``Component`` protocol, no wasm.

Commands: ``open`` (``balance``), ``deposit`` and ``withdraw`` (``amount``; never below zero),
``noop`` (no events), ``transfer_in`` (two deposits), ``unchecked_deposit`` (even without an account), and a few that return what no component
should: ``bad_type``, ``bad_payload``, ``other_stream``, ``huge`` (``size`` bytes), ``huge_second``.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

from concordance_provider.runtime import (
    ComponentFailed,
    Decision,
    Event,
    HandlerEffects,
    ProcessManagerAck,
    RejectedByComponent,
)
from concordance_provider.runtime.stats import CallStats

STREAM = "bank"


class FakeBank:
    name = "fake-bank"

    def __init__(self, stream: str = STREAM, *, fold_in_decide: bool = False) -> None:
        self.stream = stream
        self.stats = CallStats()
        self.fold_in_decide = fold_in_decide  # answer like a remote runtime: events and their fold
        self.folded_state: str | None = None  # if set, the fold decide reports (true or not)
        self.before_decide: Callable[[], Awaitable[None]] | None = None  # e.g. another writer
        self.decisions = 0
        self.folds = 0
        self.asked: list[tuple[str, str]] = []  # (aggregate, key) of each decision

    def _event(self, event_type: str, payload: dict, stream: str | None = None) -> Event:
        return Event(event_type, self.stream if stream is None else stream, json.dumps(payload))

    async def handle_command(self, aggregate: str, command_type: str, key: str, state: str | None,
                             payload: str) -> list[Event]:
        return (await self.decide(aggregate, command_type, key, state, payload)).events

    async def decide(self, aggregate: str, command_type: str, key: str, state: str | None,
                     payload: str) -> Decision:
        self.decisions += 1
        self.asked.append((aggregate, key))
        if self.before_decide is not None:
            await self.before_decide()
        events = self._decide(command_type, json.loads(state) if state else None, json.loads(payload))
        if not self.fold_in_decide:
            return Decision(events)
        if self.folded_state is not None:
            return Decision(events, True, self.folded_state)
        for event in events:
            state = self._apply(event, state)
        return Decision(events, True, state)

    def _decide(self, command_type: str, account: dict | None, data: dict) -> list[Event]:
        if command_type == "open":
            if account is not None:
                raise RejectedByComponent("account already open")
            return [self._event("account_opened", {"balance": data.get("balance", 0)})]
        if command_type == "noop":
            return []
        if command_type == "bad_type":
            return [self._event("funds.deposited", {})]
        if command_type == "bad_payload":
            return [Event("funds_deposited", self.stream, "not json")]
        if command_type == "other_stream":
            return [self._event("funds_deposited", {"amount": 1}, stream="elsewhere")]
        if command_type == "huge":
            return [self._event("note_added", {"note": "x" * data["size"]})]
        if command_type == "huge_second":
            return [self._event("funds_deposited", {"amount": 1}),
                    self._event("note_added", {"note": "x" * data["size"]})]
        if command_type == "unchecked_deposit":  # folding it fails when there is no account
            return [self._event("funds_deposited", {"amount": 1})]
        if account is None:
            raise RejectedByComponent("no such account")
        amount = data["amount"]
        if command_type == "deposit":
            return [self._event("funds_deposited", {"amount": amount})]
        if command_type == "transfer_in":
            return [self._event("funds_deposited", {"amount": amount}),
                    self._event("funds_deposited", {"amount": amount})]
        if command_type == "withdraw":
            if amount > account["balance"]:
                raise RejectedByComponent(f"insufficient funds: {amount} requested, {account['balance']} available")
            return [self._event("funds_withdrawn", {"amount": amount})]
        raise RejectedByComponent(f"unknown command {command_type!r}")

    def _apply(self, event: Event, state: str | None) -> str | None:
        data = json.loads(event.payload)
        if event.event_type == "account_opened":
            return json.dumps({"balance": data["balance"]})
        if state is None:
            raise ComponentFailed(f"{event.event_type} before the account was opened")
        account = json.loads(state)
        if event.event_type == "funds_deposited":
            account["balance"] += data["amount"]
        elif event.event_type == "funds_withdrawn":
            account["balance"] -= data["amount"]
        return json.dumps(account)

    async def apply_event(self, event: Event, state: str | None) -> str | None:
        self.folds += 1
        return self._apply(event, state)

    async def handle_event(self, event: Event, state: str | None) -> ProcessManagerAck:
        raise ComponentFailed("a bank is not a process manager")

    async def apply_stateless_event(self, event: Event, effects: HandlerEffects) -> None:
        raise ComponentFailed("a bank is not a stateless handler")

    async def close(self) -> None:
        pass


def balance(state: str | None) -> int | None:
    return json.loads(state)["balance"] if state else None
