"""Test doubles written in Python against the project's interfaces (no mock library)."""
