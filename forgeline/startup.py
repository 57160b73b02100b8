"""What a Forgeline process can start (its roles), and the errors that stop it starting."""

from __future__ import annotations


class StartupError(RuntimeError):
    """Something a person must fix before Forgeline can start; the message says what."""


ALL_ROLES = frozenset({"gateway", "worker", "relay", "projector"})
