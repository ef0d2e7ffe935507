"""Errors the server answers with, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response.

    Example:

    ```python
    >>> error_body(404, "no such model", param="model", code="model_not_found")
    {'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model', 'code': 'model_not_found'}}

    ```
    """
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


class APIError(Exception):
    """A request the server refuses: the HTTP status, a one-line message, and the request field at fault.

    Args:
        status: the HTTP status (400 bad input, 401 API key, 404 unknown model, 413 too large, 429 queue full,
            503 not serving).
        message: what is wrong and what is accepted.
        param: the request field at fault (dotted for nested fields, e.g. ``backstep.n_remove``), if one is.
        code: a short machine-readable code (``model_not_found``, ``queue_full``...), if any.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)
