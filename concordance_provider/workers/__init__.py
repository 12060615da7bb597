"""One worker per role over a shared consume-dispatch-settle skeleton."""
