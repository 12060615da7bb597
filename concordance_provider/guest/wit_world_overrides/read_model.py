"""read-model, served over the daemon callback in the messaging-handler world."""

from typing import Optional

import concordance_guest_session as session


def get(key: str) -> Optional[str]:
    return session.get(key)


def put(key: str, value: str) -> None:
    session.put(key, value)


def delete(key: str) -> None:
    session.put(key, None)
