"""Component runtimes: where the user's components run, behind one interface."""

from .component import (
    Component,
    ComponentFailed,
    ComponentUnavailable,
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
    "Event",
    "HandlerEffects",
    "OutputCommand",
    "ProcessManagerAck",
    "RejectedByComponent",
]
