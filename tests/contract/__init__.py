"""One contract for every event log and state store: the same tests, run on each implementation."""
