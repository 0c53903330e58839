"""Process and polling helpers (they live in the package because `regserve demo` uses them too)."""

from regserve_operator.sandbox.processes import free_port, start, stop, wait_for

__all__ = ["free_port", "start", "stop", "wait_for"]
