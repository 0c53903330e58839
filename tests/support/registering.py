"""Example-model logging helpers (in the package because `regserve demo` uses them too)."""

from regserve_operator.sandbox.models import log_phrasebook, log_sklearn_classifier, log_tiny_translator

__all__ = ["log_phrasebook", "log_sklearn_classifier", "log_tiny_translator"]
