"""The wire transfer process manager.

start   wire_transfer_initiated -> reserve the funds
advance funds_reserved, wire_transfer_succeeded, wire_transfer_failed
        once the funds are reserved and the other bank has answered: commit or release them
stop    funds_committed, funds_released -> the process ends

The other bank may answer before or after the reservation lands; the state remembers both.
"""

import json

import wit_world
from wit_world.imports.types import EventWithState, OutputCommand, ProcessManagerAck

AGGREGATE = "bankaccount"


def _command(command_type: str, state: dict, **extra) -> OutputCommand:
    payload = {"accountNumber": state["accountNumber"], "customerId": state["customerId"],
               "wireTransferId": state["wireTransferId"], **extra}
    return OutputCommand(command_type=command_type, aggregate_stream=AGGREGATE,
                         aggregate_key=state["accountNumber"], json_payload=json.dumps(payload))


def _settle(state: dict) -> list[OutputCommand]:
    if not state["reserved"] or state["outcome"] is None or state["settling"]:
        return []
    state["settling"] = True
    return [_command("commit_funds" if state["outcome"] == "succeeded" else "release_funds", state)]


class WitWorld(wit_world.WitWorld):
    def handle_event(self, event: EventWithState) -> ProcessManagerAck:
        data = json.loads(event.event.payload)
        kind = event.event.event_type
        if kind == "wire_transfer_initiated":
            state = {"accountNumber": data["accountNumber"], "customerId": data["customerId"],
                     "wireTransferId": data["wireTransferId"], "amount": data["amount"],
                     "reserved": False, "outcome": None, "settling": False}
            return ProcessManagerAck(state=json.dumps(state),
                                     commands=[_command("reserve_funds", state, amount=data["amount"])])
        state = json.loads(event.state)
        if kind in ("funds_committed", "funds_released"):
            return ProcessManagerAck(state=None, commands=[])
        if kind == "funds_reserved":
            state["reserved"] = True
        elif kind == "wire_transfer_succeeded":
            state["outcome"] = "succeeded"
        elif kind == "wire_transfer_failed":
            state["outcome"] = "failed"
        commands = _settle(state)
        return ProcessManagerAck(state=json.dumps(state), commands=commands)
