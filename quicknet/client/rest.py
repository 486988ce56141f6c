"""REST transport (httpx, sync and async): one `Send` step becomes one `POST /classify`.

All-raw-pixel requests go as `application/octet-stream` (N x 3072 bytes, no encoding on either
side); anything else as multipart `images` fields, raw pixels PNG-encoded (lossless, so the server
sees the same pixels). The deadline travels as `X-Request-Timeout-Ms`, a little shorter than the
client's own (10% of it, at most 20 ms, as the server does for gRPC), so the server's 504 arrives
before the client gives up."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time

import httpx

from quicknet.client.endpoint import NOBODY_LISTENS, Endpoint
from quicknet.client.inputs import Payload, pixels_to_png
from quicknet.client.plan import Send, check_choice
from quicknet.client.results import Prediction, QuickNetClientError, Result

RETRY_STATUSES = (429, 503)

# Idle pooled connections are dropped before the server's idle timeout (`--http-idle-timeout-s`,
# 5 s by default) closes them: with equal limits, a request sent on a connection the server is
# closing at that instant is lost (a reset, which is not safe to retry for a POST).
POOL = httpx.Limits(keepalive_expiry=4.0)


def _request(step: Send) -> dict:
    budget_ms = (step.timeout - min(0.02, 0.1 * step.timeout)) * 1000
    headers = {"X-Request-Timeout-Ms": f"{max(budget_ms, 1.0):.1f}"}
    params = {"top_k": step.top_k, "model": step.model, "version": step.version}
    params = {k: v for k, v in params.items() if v} or None
    if all(p.kind == "pixels" for p in step.payloads):
        headers["Content-Type"] = "application/octet-stream"
        return {"content": b"".join(p.data for p in step.payloads), "headers": headers, "params": params}
    # a file's own name travels with it, so the server's error can say it: "image 2 (IMG_7.jpg) ...";
    # bytes with no name go as `blob`, as a browser sends them, which the server does not echo
    files = [("images", (p.name or "blob", _encoded(p), "application/octet-stream")) for p in step.payloads]
    return {"files": files, "headers": headers, "params": params}


def _encoded(payload: Payload) -> bytes:
    return payload.data if payload.kind == "encoded" else pixels_to_png(payload.data)


def _retry_after(value: str | None) -> float | None:
    """Seconds, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _results(response: httpx.Response, base: str, step: Send) -> list[Result]:
    if response.status_code != 200:
        raise _status_error(response, base)
    try:
        doc = response.json()
        model, version = str(doc["model"]), str(doc["version"])
        results = [
            Result(tuple(Prediction(str(p["label"]), int(p["index"]), float(p["score"])) for p in row), model, version)
            for row in doc["predictions"]
        ]
    except (ValueError, KeyError, TypeError):
        raise QuickNetClientError(
            200, f"{base}/classify answered 200 with something else than classes: {NOT_QUICKNET}"
        ) from None
    check_choice(step, model, version)
    return results


NOT_QUICKNET = "is the URL a QuickNet server's REST address, such as http://host:8000 (no path)?"


def _status_error(response: httpx.Response, base: str = "") -> QuickNetClientError:
    try:
        doc = response.json()
        ours = isinstance(doc, dict) and "error" in doc
        message = str(doc["error"]) if ours else response.text
    except ValueError:
        ours, message = False, response.text
    message = " ".join(message.split())[:500] or response.reason_phrase
    status = response.status_code
    if status in (404, 405) and not message.startswith("model "):  # not "model 'x' is not served"
        message = f"{base}/classify is not there ({message}): {NOT_QUICKNET}"
    return QuickNetClientError(
        status,
        message,
        retry_after=_retry_after(response.headers.get("retry-after")),
        retryable=status in RETRY_STATUSES,
    )


def _is_tls(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _no_answer_hint(url: str) -> str:
    """What a connection closed without an HTTP/1.1 answer most often means, by the URL's scheme: the
    gRPC port answers HTTP/2 frames and closes; a TLS port closes on plain HTTP; a server asking for
    a client certificate closes when none comes."""
    if url.startswith("https://"):
        return (
            "if the server asks for a client certificate (mutual TLS), give one with --cert and --key; if that "
            "is the gRPC port (8001 by default), use the REST port (8000 by default), or grpcs://host:port for gRPC"
        )
    return (
        "if that is the gRPC port (8001 by default), use the REST port (8000 by default), or grpc://host:port for "
        "gRPC; if the server uses TLS, https://host:port"
    )


def transport_error(url: str, error: httpx.TransportError, timeout: float) -> QuickNetClientError:
    if isinstance(error, httpx.TimeoutException):
        return QuickNetClientError(
            504, f"no answer from {url} within the deadline of {timeout:.3g}s", from_server=False
        )
    tls = _is_tls(error)
    if isinstance(error, httpx.ConnectError):
        if tls and "CERTIFICATE_VERIFY_FAILED" in str(error):
            why = (
                "the TLS handshake failed: the server's certificate is not trusted (CERTIFICATE_VERIFY_FAILED); "
                "give its CA with --cacert"
            )
        else:
            why = "the TLS handshake failed (is --cacert the server's CA?)" if tls else _words(error, "refused")
            why += f": {NOBODY_LISTENS}" if _refused(error) else ""
        message = f"cannot reach {url}: {why}"
    elif isinstance(error, httpx.RemoteProtocolError):
        message = (
            f"{url} did not answer in HTTP/1.1 ({_words(error, 'it closed the connection')}): {_no_answer_hint(url)}"
        )
    elif isinstance(error, httpx.ReadError | httpx.WriteError) and not str(error).strip():
        # whether the client reads what such a port sends (above) or meets its close (here) is a race
        message = f"{url} closed the connection without an answer: {_no_answer_hint(url)}"
    elif tls:  # the handshake passed, then the server refused: most often a client certificate it wanted
        message = f"{url} ended the TLS connection ({_words(error, 'no reason given')}): {_no_answer_hint(url)}"
    else:
        message = f"lost the connection to {url}: {_words(error, 'the connection closed before the answer')}"
    # a refused or dropped connection is worth another try; a certificate that fails never heals
    return QuickNetClientError(None, message, retryable=not tls)


def _refused(error: BaseException) -> bool:
    """Whether nothing listened at the address (a refused connection somewhere in the chain: the
    async client says only "All connection attempts failed"), rather than a name that did not
    resolve or a network that could not be reached."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _words(error: BaseException, otherwise: str) -> str:
    """An error's own text (httpx leaves some empty), else `otherwise`."""
    text = " ".join(str(error).split())
    return text[:200] if text else otherwise


class RestTransport:
    def __init__(self, endpoint: Endpoint):
        self.url = endpoint.url
        self._http = httpx.Client(
            base_url=endpoint.url, verify=endpoint.ssl_context(), headers=endpoint.headers(), limits=POOL
        )

    def send(self, step: Send) -> list[Result]:
        try:
            response = self._http.post("/classify", timeout=step.timeout, **_request(step))
        except httpx.TransportError as e:
            raise transport_error(self.url, e, step.timeout) from None
        return _results(response, self.url, step)

    def close(self) -> None:
        self._http.close()


class AsyncRestTransport:
    def __init__(self, endpoint: Endpoint):
        self.url = endpoint.url
        self._http = httpx.AsyncClient(
            base_url=endpoint.url, verify=endpoint.ssl_context(), headers=endpoint.headers(), limits=POOL
        )

    async def send(self, step: Send) -> list[Result]:
        try:
            async with asyncio.timeout(step.timeout):  # the whole exchange, not each read
                response = await self._http.post("/classify", timeout=step.timeout, **_request(step))
        except TimeoutError:
            raise transport_error(self.url, httpx.TimeoutException("deadline"), step.timeout) from None
        except httpx.TransportError as e:
            raise transport_error(self.url, e, step.timeout) from None
        return _results(response, self.url, step)

    async def close(self) -> None:
        await self._http.aclose()
