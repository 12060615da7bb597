"""The engine core: what commands and events do to aggregates, with no message transport.

- ``mapper``: an event as component event, CloudEvent and stored message, and the conversions;
- ``persistence``: the event log and state store interfaces, their records and errors;
- ``memory``: both in memory, with JetStream's guards (tests; the contract suite's reference);
- ``repository``: an instance's current state (caught up from the log, cached), save, rebuild;
- ``processor``: a parsed command in, a ``CommandResult`` out.

The workers (``workers/aggregate.py``) adapt JetStream messages to these; ``store/`` implements
the interfaces on JetStream.
"""
