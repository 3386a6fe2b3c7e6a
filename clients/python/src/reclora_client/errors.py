"""The exceptions a call raises: one base class, a subclass per answer a caller may handle.

Every refusal by the gateway carries its error schema (status, code, message, details, request
id); failures before an answer (no connection, no answer in time) are ``NetworkError``s, which
say whether the request may have reached the gateway.
"""

from __future__ import annotations

from collections.abc import Sequence

from reclora_client.models import ErrorDetail


class RecLoRAError(Exception):
    """A call failed. ``status`` is None when no HTTP answer came back; ``attempts`` counts the
    tries made, retries included; ``retry_after_s`` is the gateway's ``Retry-After``, if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 details: Sequence[ErrorDetail] = (), request_id: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = list(details)
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.attempts = 1

    def __str__(self) -> str:
        head = f"{self.status} {self.code}" if self.status is not None else self.code
        tail = f" (request id {self.request_id})" if self.request_id else ""
        return f"{head}: {self.message}{tail}"


class InvalidRequest(RecLoRAError):
    """422 (or 400): the request breaks the wire types or the gateway's limits; ``details`` names each field."""


class NotFound(RecLoRAError):
    """404: no such route (a gateway older than this client) or resource."""


class Conflict(RecLoRAError):
    """409: e.g. events older than the user's latest stored (``out_of_order``)."""


class ContentTooLarge(RecLoRAError):
    """413: the request body is over the gateway's limit."""


class Overloaded(RecLoRAError):
    """429: refused before any work was done; retried after ``Retry-After``."""


class InternalError(RecLoRAError):
    """500: a gateway bug; quote ``request_id`` when reporting it. Not retried."""


class Unavailable(RecLoRAError):
    """503: a dependency is down or the model is not loaded yet; retried after ``Retry-After``."""


class UnexpectedResponse(RecLoRAError):
    """A 2xx answer whose body is not the documented shape (a different service on the URL?)."""


class NetworkError(RecLoRAError):
    """No HTTP answer. ``request_sent`` is False when the request surely never reached the gateway."""

    request_sent = True


class ConnectionFailed(NetworkError):
    """No connection could be made (refused, unreachable, connect or pool timeout): nothing was sent."""

    request_sent = False


class TimedOut(NetworkError):
    """The request was sent but no answer came in time: the gateway may have acted on it."""


STATUS_ERRORS: dict[int, type[RecLoRAError]] = {
    400: InvalidRequest, 404: NotFound, 409: Conflict, 413: ContentTooLarge, 422: InvalidRequest, 429: Overloaded,
    500: InternalError, 503: Unavailable,
}
