"""How much of a request body `sandboxd api` reads: a control-plane call's JSON is small, an
upload to `/files` is a few files. A body declared larger is refused before it is read; a
body without a declared length is counted as it arrives and refused once past the bound,
so nothing (memory, Starlette's spooled temporary files) grows with what a client sends.
Connect-RPC calls are not bounded here (stdin streams are long by nature; each message is
bounded by the RPC library)."""

from starlette.responses import JSONResponse
from starlette.types import Message, Receive

MAX_BODY = 1024 * 1024  # a control-plane call: JSON of a create, a timeout, a connect
MAX_FILES_BODY = 128 * 1024 * 1024  # POST /files: several files of at most 32 MiB each


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the {limit} bytes served here")
        self.limit = limit

    def response(self) -> JSONResponse:
        return JSONResponse({"code": 413, "message": str(self)}, 413)


def limit_for(path: str) -> int:
    return MAX_FILES_BODY if path == "/files" else MAX_BODY


def declared(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares; -1 when it is not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else -1
    return None


def bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, raising BodyTooLarge once the body read passes `limit`."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return counted
