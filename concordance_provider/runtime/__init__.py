"""Component runtimes: where the user's components run, behind one interface."""

from .component import (
    Component,
    ComponentFailed,
    ComponentUnavailable,
    Decision,
    Event,
    HandlerEffects,
    OutputCommand,
    ProcessManagerAck,
    RejectedByComponent,
)

__all__ = [
    "Component",
    "ComponentFailed",
    "ComponentUnavailable",
    "Decision",
    "Event",
    "HandlerEffects",
    "OutputCommand",
    "ProcessManagerAck",
    "RejectedByComponent",
]
