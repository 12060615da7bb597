"""Everything kept in JetStream: streams, the event log, state, results and read models."""
