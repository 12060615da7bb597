"""Concordance: an event-sourcing engine for WebAssembly components on NATS JetStream."""

__version__ = "0.1.0"
