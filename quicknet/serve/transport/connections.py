"""Connection guards for the REST port: clients that connect and say nothing, or trickle a
request head byte by byte (slowloris), are closed on time instead of holding a socket forever.

uvicorn's httptools protocol times out only the wait *between* requests on a kept-alive
connection (`timeout_keep_alive`); a fresh connection that sends nothing, and a request head that
never ends, wait without limit. Each costs a file descriptor, and enough of them exhaust the
process's limit. This subclass adds the two missing timers:
- a new connection must send its first byte within `http_idle_timeout_s` (the keep-alive timeout's twin);
- a request head (request line and headers) must be complete `header_timeout_s` after its first
  byte arrived, or the client gets 408 and the connection closes.
And a request head is limited in size (`max_header_bytes`, 64 KiB: the request line and every
header) and in header count (`MAX_HEADERS`): past either, the client gets 431 and the connection
closes. The size is counted as bytes arrive, before the parser sees them: httptools joins a header
split over several reads chunk by chunk (quadratic: a 64 MiB header stalled the loop for seconds),
and the head is refused before any middleware, so before the API key check too.
The body has its own deadline (`body_read_timeout_s`, in `transport.middleware`). And a request answered
before its body arrived (401 without a key, 413 by declared length, 429 at capacity) gets that same
limit for the rest of its body, after the answer: otherwise the remainder is read under no timer at
all (uvicorn drops its keep-alive timer on the next byte, and the head timer is done), so a client
could refuse to finish it and hold the socket forever.

Lingering close (as Apache and nginx do it): when the server closes a connection whose client may
still be sending (a 408 mid-head or mid-body, an answer before the body with `Connection: close`),
closing at once with unread bytes makes the kernel send a reset, and the client can lose the answer
it was just sent. So such a close sends FIN only (write side), reads and discards whatever else
arrives for up to `LINGER_S`, and closes when the client hangs up or that time is over.

Cost: two timer handles per request head, a few microseconds.

A handler also learns about its connection from here, without a task or timer of its own
(`ConnectionState`, in the scope as `CONNECTION`): whether a body is still arriving (when not,
the body's deadline needs no timer) and, by a cancel of its task, that the client went away.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from quicknet.serve import metrics

_TIMEOUT_BODY = json.dumps({"error": "request head not received in time"}).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)

MAX_HEADERS = 100  # Apache's LimitRequestFields; a browser sends about 20


def _refusal(status: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


LINGER_S = 2.0

CONNECTION = "quicknet.connection"  # the scope key of a request's `ConnectionState`


class ConnectionState:
    """One REST connection, as its handlers see it. `body_pending`: a request body is still
    arriving on it. `lost`: the client went away. `handler`: the task to cancel if it does (set by
    `watch` while a request's work runs; uvicorn runs one request of a connection at a time)."""

    __slots__ = ("_resume_reading", "body_pending", "handler", "lost")

    def __init__(self, resume_reading) -> None:
        self._resume_reading = resume_reading
        self.body_pending = False
        self.handler: asyncio.Task | None = None
        self.lost = False

    def watch(self, task: asyncio.Task | None) -> None:
        """Cancel `task` if the client goes away (None: stop watching). Reading resumes: uvicorn
        pauses it under a large body, and a paused connection would not see the client leave."""
        self.handler = task
        if task is not None:
            self._resume_reading()


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` lingers while the client may still
    be sending (see the module's docstring); writes of one loop iteration leave together; everything
    else is the real transport."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol):
        self._transport = transport
        self._protocol = protocol
        self._pending: list[bytes] = []

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        """uvicorn writes a response's head and its body apart, a system call each (a third of a
        front's CPU per request went to writes): the first write of a loop iteration schedules one
        flush, the others join it."""
        if not self._pending:
            self._protocol.loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            if not self._transport.is_closing():
                self._transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def close(self) -> None:
        self._flush()  # what was written goes out before the close (or the lingering half-close)
        protocol, transport = self._protocol, self._transport
        if protocol._lingering or transport.is_closing():
            return
        if (protocol._in_body or protocol._timing_head) and transport.can_write_eof():  # TLS cannot half-close
            protocol._linger()
        else:
            transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set by `protocol_for`
    idle_timeout_s = 5.0
    body_timeout_s = 30.0
    max_head_bytes = 64 << 10

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        self._lingering = False
        self._refused = False
        self._head_bytes = 0  # of the open head, counted as they arrive
        self._heads_done = 0  # heads read whole on this connection
        self._header_count = 0
        self._state = ConnectionState(lambda: self.flow.resume_reading())
        self._answered_early = False
        self._timer: asyncio.TimerHandle | None = None
        self._timing_head = False
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm(self.idle_timeout_s, self._idle, head=False)

    @property
    def _in_body(self) -> bool:
        """A request body is arriving (the handlers' `ConnectionState` says the same)."""
        return self._state.body_pending

    @_in_body.setter
    def _in_body(self, value: bool) -> None:
        self._state.body_pending = value

    def _linger(self) -> None:
        self._lingering = True
        self._disarm()
        self._raw_transport.write_eof()  # the answer already written goes out, then FIN
        self._timer = self.loop.call_later(LINGER_S, self._raw_transport.close)

    def eof_received(self) -> bool | None:
        if self._lingering:  # the client hung up: done
            self._raw_transport.close()
            return None
        return super().eof_received()

    def _arm(self, seconds: float, callback, *, head: bool) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)
        self._timing_head = head

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._refused:  # after our answer and FIN: read and drop
            return
        if not self._in_body and not self._timing_head:  # the first byte of a request head
            self._arm(self.header_timeout_s, self._head_too_slow, head=True)
        while data and not self._in_body:  # (part of) a head: at most `max_head_bytes` reach the parser
            room = self.max_head_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                break
            done = self._heads_done
            self._head_bytes = self.max_head_bytes
            super().data_received(data[:room])  # the head may end in here, the rest being body or the next head
            data = data[room:]
            if self._refused or self.transport.is_closing():
                return
            if self._heads_done != done:  # that head ended in there; the next one starts afresh
                self._head_bytes = 0
                continue
            self._refuse(f"request head exceeds {self.max_head_bytes} bytes")
            return
        if data:
            super().data_received(data)

    def _refuse(self, message: str) -> None:
        """431 for a head over a limit: no request runs; the connection closes (lingering)."""
        self._refused = True
        metrics.rejected("rest", "head_too_large")
        self.transport.write(_refusal(b"431 Request Header Fields Too Large", message))
        self.transport.close()

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()
        self.scope[CONNECTION] = self._state

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= MAX_HEADERS:  # past it, dropped: the head is refused when it ends
            super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

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
        self._head_bytes = 0
        self._heads_done += 1
        if self._refused:  # a request pipelined behind a refused one: never run
            return
        if self._header_count > MAX_HEADERS:
            self._in_body = True  # lingering close: the client may still be sending its body
            self._refuse(f"request has {self._header_count} headers; the limit is {MAX_HEADERS}")
            return
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        if self._answered_early:  # the rest of an answered body is in: idle from here, as after any answer
            self._answered_early = False
            self._arm(self.idle_timeout_s, self._idle, head=False)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_body and not self.transport.is_closing():  # answered before its body was read
            self._answered_early = True
            self._arm(self.body_timeout_s, self._idle, head=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        state = self._state
        state.lost = True
        if state.handler is not None and not state.handler.done():
            state.handler.cancel()  # its client is gone: the work it waits on is dropped
        super().connection_lost(exc)


def protocol_for(
    header_timeout_s: float, idle_timeout_s: float, body_timeout_s: float, max_head_bytes: int = 64 << 10
) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    limits = {
        "header_timeout_s": header_timeout_s,
        "idle_timeout_s": idle_timeout_s,
        "body_timeout_s": body_timeout_s,
        "max_head_bytes": max_head_bytes,
    }
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), limits)
