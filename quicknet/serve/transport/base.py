"""What a front is, for each transport (as LitServe's `specs/base.py` says what a model is): a
module that declares these names. `main.py` lists the fronts; `transport/app.py` and
`transport/grpc.py` build the servers from them and read nothing else of a front.

Modules satisfy these Protocols by their attributes, as a type checker sees them;
`tests/test_layers.py` checks every listed front declares every name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import grpc
    from fastapi import APIRouter
    from google.protobuf.descriptor import FileDescriptor
    from pydantic import BaseModel

    from quicknet.serve.runtime import Runtime


class RestFront(Protocol):
    PROTOCOL: str  # its routes' tag in metrics, logs and access lines
    OPENAPI_SCHEMAS: tuple[type[BaseModel], ...]  # request bodies its routes document by reference

    def router(self, runtime: Runtime) -> APIRouter: ...


class GrpcFront(Protocol):
    PROTOCOL: str
    SERVICE_NAMES: tuple[str, ...]  # what the standard health service answers for
    PROTO_FILE: FileDescriptor  # its .proto, for reflection (grpcurl, Postman)
    PUBLIC_METHODS: tuple[str, ...]  # methods that answer without an API key (its health checks)

    def add_to_server(self, server: grpc.aio.Server, runtime: Runtime) -> list[str]: ...
