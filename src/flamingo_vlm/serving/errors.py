"""One error type for bad requests: an HTTP status and a message that names the problem."""

from __future__ import annotations


class RequestError(Exception):
    """A client error: ``status`` is a 4xx code, ``message`` says what is wrong and where (``prompt[2].image``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict:
        return {"error": {"status": self.status, "message": self.message}}


def bad_request(message: str) -> RequestError:
    """400: the request cannot be read (malformed JSON, base64 or image bytes)."""
    return RequestError(400, message)


def too_large(message: str) -> RequestError:
    """413: the request is over a size limit (body bytes, image pixels, media per request, prompt tokens)."""
    return RequestError(413, message)


def invalid(message: str) -> RequestError:
    """422: the request is readable but a value is invalid or over a parameter limit."""
    return RequestError(422, message)
