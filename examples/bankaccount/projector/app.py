"""The bank account projector: balances and a ledger per account, in a queryable read model.

Read model keys (NATS KV bucket CC_RM_bankaccount_projector):
  balance.{accountNumber}        -> {"accountNumber", "customerId", "balance", "reserved", "entries"}
  ledger.{accountNumber}.{n}     -> {"event", "amount", "note", "balance"}, n = 000001, 000002, ...

One ledger entry per key keeps the cost of an event constant however long the history grows.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import read_model
from wit_world.imports.types import Event

# how each event moves the balance and the reserved amount
BALANCE_DELTA = {
    "funds_deposited": 1,
    "funds_withdrawn": -1,
}


def _load(key: str, default):
    raw = read_model.get(key)
    return json.loads(raw) if raw is not None else default


class WitWorld(wit_world.WitWorld):
    def apply_stateless_event(self, event: Event) -> None:
        data = json.loads(event.payload)
        account = data.get("accountNumber")
        if not account:
            raise Err(f"{event.event_type} has no accountNumber")
        balance = _load(f"balance.{account}", None)
        if event.event_type == "account_created":
            balance = {"accountNumber": account, "customerId": data.get("customerId"),
                       "balance": data.get("initialBalance", 0), "reserved": 0, "entries": 0}
            amount = balance["balance"]
        elif balance is None:
            raise Err(f"{event.event_type} for unknown account {account}")
        elif event.event_type in BALANCE_DELTA:
            amount = BALANCE_DELTA[event.event_type] * data["amount"]
            balance["balance"] += amount
        elif event.event_type == "funds_reserved":
            amount = 0
            balance["reserved"] += data["amount"]
            read_model.put(f"reservation.{data['wireTransferId']}", json.dumps(data["amount"]))
        elif event.event_type in ("funds_committed", "funds_released"):
            reserved = _load(f"reservation.{data['wireTransferId']}", 0)
            read_model.delete(f"reservation.{data['wireTransferId']}")
            balance["reserved"] -= reserved
            amount = -reserved if event.event_type == "funds_committed" else 0
            balance["balance"] += amount
        else:
            return
        balance["entries"] += 1
        read_model.put(f"balance.{account}", json.dumps(balance))
        entry = {"event": event.event_type, "amount": amount, "note": data.get("note", ""),
                 "balance": balance["balance"]}
        read_model.put(f"ledger.{account}.{balance['entries']:06d}", json.dumps(entry))
