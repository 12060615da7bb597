"""The bank account aggregate: f(command, state) = [events] and f(state, event) = state'.

Rules: an account never goes below its minimum balance, and funds reserved for a wire transfer
are not available to withdraw, wire or reserve again.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Event, EventWithState, StateAck, StatefulCommand

STREAM = "bankaccount"


def _event(event_type: str, payload: dict) -> Event:
    return Event(event_type=event_type, stream=STREAM, payload=json.dumps(payload))


def _available(state: dict) -> int:
    return state["balance"] - sum(state["reservedFunds"].values()) - state["minBalance"]


def _positive_amount(data: dict) -> int:
    amount = data.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise Err(f"amount must be a positive integer, got {amount!r}")
    return amount


def _require(data: dict, *fields: str) -> None:
    missing = [f for f in fields if f not in data]
    if missing:
        raise Err(f"missing field(s): {', '.join(missing)}")


def _decide(command_type: str, state: dict | None, data: dict) -> list[Event]:
    if command_type == "create_account":
        _require(data, "accountNumber", "customerId")
        if state is not None:
            raise Err(f"account {data['accountNumber']} already exists")
        return [_event("account_created", {
            "accountNumber": data["accountNumber"],
            "initialBalance": int(data.get("initialBalance", 0)),
            "minBalance": int(data.get("minBalance", 0)),
            "customerId": data["customerId"],
        })]
    if state is None:
        raise Err("account does not exist")
    if command_type == "deposit_funds":
        _require(data, "amount", "customerId")
        amount = _positive_amount(data)
        return [_event("funds_deposited", {**_base(state, data), "amount": amount, "note": data.get("note", "")})]
    if command_type == "withdraw_funds":
        _require(data, "amount", "customerId")
        amount = _positive_amount(data)
        if amount > _available(state):
            raise Err(f"insufficient funds: {amount} requested, {max(_available(state), 0)} available")
        return [_event("funds_withdrawn", {**_base(state, data), "amount": amount, "note": data.get("note", "")})]
    if command_type == "wire_funds":
        _require(data, "amount", "customerId", "wireTransactionId", "targetRoutingNumber", "targetAccountNumber")
        amount = _positive_amount(data)
        if amount > _available(state):
            raise Err(f"insufficient funds to wire: {amount} requested, {max(_available(state), 0)} available")
        return [_event("wire_transfer_initiated", {
            **_base(state, data), "amount": amount, "note": data.get("note", ""),
            "wireTransferId": data["wireTransactionId"],
            "targetRoutingNumber": data["targetRoutingNumber"],
            "targetAccountNumber": data["targetAccountNumber"],
        })]
    if command_type == "reserve_funds":
        _require(data, "amount", "customerId", "wireTransferId")
        amount = _positive_amount(data)
        if data["wireTransferId"] in state["reservedFunds"]:
            raise Err(f"funds already reserved for {data['wireTransferId']}")
        if amount > _available(state):
            raise Err(f"insufficient funds to reserve: {amount} requested, {max(_available(state), 0)} available")
        return [_event("funds_reserved", {**_base(state, data), "amount": amount, "wireTransferId": data["wireTransferId"]})]
    if command_type in ("commit_funds", "release_funds"):
        _require(data, "customerId", "wireTransferId")
        if data["wireTransferId"] not in state["reservedFunds"]:
            raise Err(f"no funds reserved for wire transfer {data['wireTransferId']}")
        event_type = "funds_committed" if command_type == "commit_funds" else "funds_released"
        return [_event(event_type, {**_base(state, data), "wireTransferId": data["wireTransferId"]})]
    raise Err(f"unknown command type {command_type!r}")


def _base(state: dict, data: dict) -> dict:
    return {"accountNumber": state["accountNumber"], "customerId": data.get("customerId", state["customerId"])}


def _apply(event_type: str, state: dict | None, data: dict) -> dict | None:
    if event_type == "account_created":
        return {
            "accountNumber": data["accountNumber"], "customerId": data["customerId"],
            "balance": data.get("initialBalance", 0), "minBalance": data.get("minBalance", 0),
            "reservedFunds": {},
        }
    if state is None:
        raise Err(f"{event_type} for an account that does not exist")
    state = {**state, "reservedFunds": dict(state["reservedFunds"])}
    if event_type == "funds_deposited":
        state["balance"] += data["amount"]
    elif event_type == "funds_withdrawn":
        state["balance"] -= data["amount"]
    elif event_type == "funds_reserved":
        state["reservedFunds"][data["wireTransferId"]] = data["amount"]
    elif event_type == "funds_committed":
        state["balance"] -= state["reservedFunds"].pop(data["wireTransferId"], 0)
    elif event_type == "funds_released":
        state["reservedFunds"].pop(data["wireTransferId"], None)
    return state  # wire_transfer_initiated changes nothing until funds are reserved


class WitWorld(wit_world.WitWorld):
    def handle_command(self, command: StatefulCommand) -> list[Event]:
        state = json.loads(command.state) if command.state else None
        try:
            data = json.loads(command.payload)
        except ValueError:
            raise Err("command payload is not JSON")
        if not isinstance(data, dict):
            raise Err("command payload must be a JSON object")
        return _decide(command.command_type, state, data)

    def apply_event(self, event: EventWithState) -> StateAck:
        state = json.loads(event.state) if event.state else None
        new_state = _apply(event.event.event_type, state, json.loads(event.event.payload))
        return StateAck(state=json.dumps(new_state) if new_state is not None else None)
