"""Domain errors: every refusal the domain makes has its own type, so adapters can map it."""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every error the domain raises on purpose."""

    code = "domain_error"


class IllegalTransition(DomainError):
    """The aggregate's status does not allow the asked-for change; nothing was recorded."""

    code = "illegal_transition"

    def __init__(self, aggregate: str, status: str, action: str) -> None:
        super().__init__(f"{aggregate} in status '{status}' cannot {action}")
        self.status = status
        self.action = action


class RunStillActive(DomainError):
    """A rerun was asked for while the latest run has not ended."""

    code = "run_active"


class NothingToCancel(DomainError):
    """A cancel was asked for, but no run of the request is active."""

    code = "nothing_active"
