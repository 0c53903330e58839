"""Errors the serving app answers with: a stable `error` code, a human message, and the HTTP status."""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        return body


class InvalidVersion(ServingError):
    status_code = 400
    code = "invalid_version"


class Unauthorized(ServingError):
    status_code = 401
    code = "unauthorized"


class VersionNotAllowed(ServingError):
    """The resource's pinning policy (`spec.serving.pinning`) refuses the pinned version."""

    status_code = 403
    code = "version_not_allowed"


class UnknownVersion(ServingError):
    status_code = 404
    code = "unknown_version"


class IncompatibleVersion(ServingError):
    status_code = 409
    code = "incompatible_signature"


class BodyTooLarge(ServingError):
    status_code = 413
    code = "body_too_large"


class UnsupportedMediaType(ServingError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInput(ServingError):
    status_code = 422
    code = "invalid_input"


class TooManyColdLoads(ServingError):
    """The replica loaded as many pinned versions it did not hold as it may for now (Retry-After)."""

    status_code = 429
    code = "too_many_cold_loads"


class PredictionFailed(ServingError):
    status_code = 500
    code = "prediction_failed"


class VersionLoadFailed(ServingError):
    status_code = 500
    code = "version_load_failed"


class RegistryUnavailable(ServingError):
    status_code = 503
    code = "registry_unavailable"


class NotReady(ServingError):
    status_code = 503
    code = "not_ready"
