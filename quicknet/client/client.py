"""`Client` and `AsyncClient`: the same calls, blocking or awaited. Each only performs the steps
that `plan` yields (send a request, sleep before a retry) with its transport, so retries, limits
and error isolation are one piece of code for both."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from quicknet.client.endpoint import Endpoint
from quicknet.client.inputs import to_item, to_items
from quicknet.client.plan import MAX_GRPC_BYTES, MAX_IMAGES_PER_REQUEST, MAX_REST_BYTES, Limits, Plan, Send, split
from quicknet.client.plan import classify_group as _classify_group
from quicknet.client.results import QuickNetClientError, Result
from quicknet.client.retry import Retry

Image = Any  # str | os.PathLike | bytes | numpy uint8 H x W x 3 | PIL.Image.Image
Outcome = Result | QuickNetClientError


class _Settings:
    def __init__(
        self,
        url: str | None,
        *,
        api_key: str | None,
        timeout: float,
        cacert: str | os.PathLike | None,
        cert: str | os.PathLike | None,
        key: str | os.PathLike | None,
        retry: Retry | None,
        top_k: int | None,
        max_images_per_request: int,
        max_request_bytes: int | None,
        model: str | None = None,
        version: int | str | None = None,
        resize: bool = False,
    ):
        self.endpoint = Endpoint.resolve(url, api_key=api_key, cacert=cacert, cert=cert, key=key)
        self.choice = _choice(model, version)
        self.resize = bool(resize)
        self.timeout = _positive(timeout)
        self.retry = retry or Retry()
        self.top_k = top_k
        default_bytes = MAX_REST_BYTES if self.endpoint.protocol == "rest" else MAX_GRPC_BYTES
        self.limits = Limits(max_images_per_request, max_request_bytes or default_bytes)

    @property
    def url(self) -> str:
        e = self.endpoint
        return e.url if e.protocol == "rest" else f"{'grpcs' if e.tls else 'grpc'}://{e.url}"

    def transport(self, asynchronous: bool):
        """The endpoint's transport; grpc and the stubs are imported only when gRPC is used."""
        if self.endpoint.protocol == "grpc":
            from quicknet.client import rpc

            return (rpc.AsyncGrpcTransport if asynchronous else rpc.GrpcTransport)(self.endpoint)
        from quicknet.client import rest

        return (rest.AsyncRestTransport if asynchronous else rest.RestTransport)(self.endpoint)

    def _groups(self, items, return_exceptions: bool, top_k: int | None, timeout: float | None) -> list[Plan]:
        timeout = _positive(timeout) if timeout is not None else self.timeout
        top_k = top_k if top_k is not None else self.top_k
        return [
            _classify_group(
                items,
                group,
                top_k=top_k,
                timeout=timeout,
                retry=self.retry,
                limits=self.limits,
                clock=time.monotonic,
                return_exceptions=return_exceptions,
                choice=self.choice,
            )
            for group in split(range(len(items)), items, self.limits)
        ]


def _choice(model: str | None, version: int | str | None) -> tuple[str | None, str | None]:
    """(model, version) as the requests carry them, checked here by the server's own rules: a
    name is one model store folder's (quicknet.store.check_name), a version a whole number."""
    from quicknet import store

    if model is not None:
        try:
            store.check_name(model)
        except store.InvalidName as e:
            raise ValueError(str(e)) from None
    if version is None:
        return model, None
    text = str(version)
    if isinstance(version, bool) or not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise ValueError(f"version is a whole number from 1, got {version!r}")
    return model, str(int(text))


def _positive(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout is in seconds and must be positive, got {timeout!r}")
    return float(timeout)


_DOC = """
    `url`: `http(s)://host:port` (REST), `grpc(s)://host:port` (gRPC), or `host:port` (REST over
    http); default `QUICKNET_URL`, else `http://127.0.0.1:${QUICKNET_HTTP_PORT:-8000}`.
    `api_key`: sent as `Authorization: Bearer` (default `QUICKNET_API_KEY`). `cacert`: trust this
    CA; `cert` + `key`: a client certificate (mutual TLS). `timeout`: seconds one request may take,
    its retries included (each call may override it). `retry`: attempts and backoff for 429/503,
    RESOURCE_EXHAUSTED/UNAVAILABLE and refused connections. `top_k`: classes per image (server
    default 5). `model`, `version`: which served model (and version) answers (default: the
    server's default model, its newest version); a server that answers with another raises.
    `resize`: shrink every image here to the model's 32x32 input and send raw pixels (3 KiB an
    image: a 14 MB photo is not refused as too large; the pixels equal the server's decode).
    `max_images_per_request`, `max_request_bytes`: the server's limits (defaults: its
    documented 256 images and 64 MiB REST / 16 MiB gRPC); a server set lower names its limit in a
    413 and the client follows it."""


class Client:
    __doc__ = "A blocking QuickNet client (REST or gRPC); use it as a context manager or close() it.\n" + _DOC

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        cacert: str | os.PathLike | None = None,
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
        retry: Retry | None = None,
        top_k: int | None = None,
        max_images_per_request: int = MAX_IMAGES_PER_REQUEST,
        max_request_bytes: int | None = None,
        model: str | None = None,
        version: int | str | None = None,
        resize: bool = False,
    ):
        self._s = _Settings(
            url,
            api_key=api_key,
            timeout=timeout,
            cacert=cacert,
            cert=cert,
            key=key,
            retry=retry,
            top_k=top_k,
            max_images_per_request=max_images_per_request,
            max_request_bytes=max_request_bytes,
            model=model,
            version=version,
            resize=resize,
        )
        self._transport = self._s.transport(asynchronous=False)

    @property
    def url(self) -> str:
        return self._s.url

    @property
    def limits(self) -> Limits:
        return self._s.limits

    def classify(self, image: Image, *, top_k: int | None = None, timeout: float | None = None) -> Result:
        """One image: a path, encoded bytes, a uint8 H x W x 3 array or a PIL image."""
        (plan,) = self._s._groups([to_item(image, self._s.resize)], False, top_k, timeout)
        return self._run(plan)[0]  # type: ignore[return-value]

    def classify_batch(
        self,
        images: Iterable[Image] | np.ndarray,
        *,
        top_k: int | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Outcome]:
        """Many images (a list, or a uint8 N x H x W x 3 array), in as many requests as the limits
        need, one after another; results in input order. With `return_exceptions`, an image that
        failed (a bad image, or its request's deadline, refusal or engine failure) has its
        QuickNetClientError in its place, and only errors about the whole call (unreachable, TLS,
        API key) raise."""
        items = to_items(images, self._s.resize)
        out: dict[int, Outcome] = {}
        for plan in self._s._groups(items, return_exceptions, top_k, timeout):
            out.update(self._run(plan))
        return [out[i] for i in range(len(items))]

    def _run(self, plan: Plan) -> dict[int, Outcome]:
        reply = None
        try:
            while True:
                step = plan.send(reply)
                if isinstance(step, Send):
                    try:
                        reply = self._transport.send(step)
                    except QuickNetClientError as e:
                        reply = e
                else:
                    time.sleep(step.seconds)
                    reply = None
        except StopIteration as done:
            return done.value

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    __doc__ = (
        "An asyncio QuickNet client (REST on httpx, gRPC on grpc.aio); `async with` it or aclose() it.\n"
        + _DOC
        + """
    `max_concurrency`: requests in flight at once, over every call of this client."""
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        cacert: str | os.PathLike | None = None,
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
        retry: Retry | None = None,
        top_k: int | None = None,
        max_images_per_request: int = MAX_IMAGES_PER_REQUEST,
        max_request_bytes: int | None = None,
        max_concurrency: int = 4,
        model: str | None = None,
        version: int | str | None = None,
        resize: bool = False,
    ):
        self._s = _Settings(
            url,
            api_key=api_key,
            timeout=timeout,
            cacert=cacert,
            cert=cert,
            key=key,
            retry=retry,
            top_k=top_k,
            max_images_per_request=max_images_per_request,
            max_request_bytes=max_request_bytes,
            model=model,
            version=version,
            resize=resize,
        )
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._transport = self._s.transport(asynchronous=True)

    @property
    def url(self) -> str:
        return self._s.url

    @property
    def limits(self) -> Limits:
        return self._s.limits

    async def classify(self, image: Image, *, top_k: int | None = None, timeout: float | None = None) -> Result:
        """One image: a path, encoded bytes, a uint8 H x W x 3 array or a PIL image."""
        (plan,) = self._s._groups([to_item(image, self._s.resize)], False, top_k, timeout)
        return (await self._run(plan))[0]  # type: ignore[return-value]

    async def classify_batch(
        self,
        images: Iterable[Image] | np.ndarray,
        *,
        top_k: int | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Outcome]:
        """As `Client.classify_batch`, with its requests in flight together (up to `max_concurrency`)."""
        items = to_items(images, self._s.resize)
        tasks = [asyncio.ensure_future(self._run(p)) for p in self._s._groups(items, return_exceptions, top_k, timeout)]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: dict[int, Outcome] = {}
        for part in parts:
            out.update(part)
        return [out[i] for i in range(len(items))]

    async def _run(self, plan: Plan) -> dict[int, Outcome]:
        # a slot is held for the whole group, pauses included: images are read only once their
        # group has a slot (memory stays bounded), and a refused group does not let others pile on
        async with self._slots:
            reply = None
            try:
                while True:
                    step = plan.send(reply)
                    if isinstance(step, Send):
                        try:
                            reply = await self._transport.send(step)
                        except QuickNetClientError as e:
                            reply = e
                    else:
                        await asyncio.sleep(step.seconds)
                        reply = None
            except StopIteration as done:
                return done.value

    async def aclose(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
