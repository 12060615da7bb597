"""The fault suite: load, kills and restarts, then an audit of the log, state and read models."""
