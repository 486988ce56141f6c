"""Connection guards for the REST port: clients that connect and say nothing, or trickle a
request head byte by byte (slowloris), are closed on time instead of holding a socket forever.

uvicorn's httptools protocol times out only the wait *between* requests on a kept-alive
connection (`timeout_keep_alive`); a fresh connection that sends nothing, and a request head that
never ends, wait without limit. Each costs a file descriptor, and enough of them exhaust the
process's limit. This subclass adds the two missing timers:
- a new connection must send its first byte within `http_idle_timeout_s` (the keep-alive timeout's twin);
- a request head (request line and headers) must be complete `header_timeout_s` after its first
  byte arrived, or the client gets 408 and the connection closes.
The body has its own deadline (`body_read_timeout_s`, in `transport.http`). Cost: two timer
handles per request head, a few microseconds.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics

_TIMEOUT_BODY = json.dumps({"error": "request head not received in time"}).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set by `protocol_for`
    idle_timeout_s = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._timing_head = False
        self._arm(self.idle_timeout_s, self._idle, head=False)

    def _arm(self, seconds: float, callback, *, head: bool) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)
        self._timing_head = head

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if not self._in_body and not self._timing_head:  # the first byte of a request head
            self._arm(self.header_timeout_s, self._head_too_slow, head=True)
        super().data_received(data)

    def _idle(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _head_too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            metrics.rejected("rest", "slow_client")
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._timing_head = False
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_for(header_timeout_s: float, idle_timeout_s: float) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"header_timeout_s": header_timeout_s, "idle_timeout_s": idle_timeout_s},
    )
