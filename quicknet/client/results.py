"""What a call returns or raises: small frozen dataclasses shaped like the server's answer, and
one exception type, so callers handle REST and gRPC alike."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """One class of an image's top-k: `score` is the softmax probability."""

    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Result:
    """One image's answer: its top-k, best first, and the model version that computed it (during a
    version swap, images of one call may come from different versions)."""

    predictions: tuple[Prediction, ...]
    model: str
    version: str

    @property
    def label(self) -> str:
        """The top-1 label."""
        return self.predictions[0].label

    @property
    def score(self) -> float:
        """The top-1 score."""
        return self.predictions[0].score


# "image 2 is ...", "image 2 (IMG_1.jpg) is ...", "image 2: ..." (the server counts from 1)
_IMAGE_PREFIX = re.compile(r"^image \d+(?: \(.*?\))?(?:: | is | )")


class QuickNetClientError(Exception):
    """Every failure of a call, whatever the transport.

    `status` is the HTTP status (gRPC codes are given their HTTP twin: INVALID_ARGUMENT 400,
    UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...), or
    None when no server answered (unreachable, TLS) or an input could not be read. `message` is the
    server's one-line error, verbatim. `image` is the index, in the caller's images, of the image the
    error is about, when it is about one. `retryable` says whether the client retried it (429, 503,
    a connection that failed); `retry_after` is the server's hint in seconds. `from_server` is false
    for what the client concluded itself (no answer before the deadline: 504)."""

    def __init__(
        self,
        status: int | None,
        message: str,
        *,
        grpc_code: str | None = None,
        retry_after: float | None = None,
        retryable: bool = False,
        image: int | None = None,
        from_server: bool | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.grpc_code = grpc_code
        self.retry_after = retry_after
        self.retryable = retryable
        self.image = image
        self.from_server = status is not None if from_server is None else from_server

    def __str__(self) -> str:
        if self.grpc_code is not None:
            return f"gRPC {self.grpc_code}: {self.message}"
        if self.from_server:
            return f"server answered {self.status}: {self.message}"
        return self.message

    def for_image(self, image: int) -> QuickNetClientError:
        """The same error, about one image of a request that failed as a whole."""
        return QuickNetClientError(
            self.status,
            self.message,
            grpc_code=self.grpc_code,
            retry_after=self.retry_after,
            retryable=self.retryable,
            image=image,
            from_server=self.from_server,
        )

    @property
    def reason(self) -> str:
        """The message without the server's `image N (name) is` prefix: what to print after a file
        name (N counts within one request, not the caller's list)."""
        return _IMAGE_PREFIX.sub("", self.message, count=1)
