"""What to send, and what to do with each answer, without any I/O ("sans-IO"): split a call's
images into requests under the server's limits, retry refusals that say "later", learn a smaller
limit from a 413 that names it, and, when the server names one bad image of a request, set that
image aside and resend the others. Written once as generators that yield `Send` and `Sleep` steps;
the sync and async clients only perform the steps, so both behave identically.

The server answers a request as a whole: one undecodable image fails its request with
"image N ...", N counting from 1 within that request (`image N (name) ...` where the part had a
file name). Isolating it costs one more request per bad image, never a request per image."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from quicknet.client.inputs import Item, Payload
from quicknet.client.results import QuickNetClientError, Result
from quicknet.client.retry import Retry

# The server's documented defaults (`quicknet serve --help`): images per request, REST body bytes,
# gRPC message bytes. A server set lower says so in its 413, and the client follows.
MAX_IMAGES_PER_REQUEST = 256
MAX_REST_BYTES = 64 << 20
MAX_GRPC_BYTES = 16 << 20
PART_OVERHEAD = 256  # a multipart part's headers, or a protobuf Image's framing, with room to spare


@dataclass
class Limits:
    """What one request may carry. Shared by a client's calls, and lowered (never raised) when a
    server's refusal names a smaller limit than the client assumed."""

    max_images: int = MAX_IMAGES_PER_REQUEST
    max_bytes: int = MAX_REST_BYTES

    def learn(self, error: QuickNetClientError) -> bool:
        """True if `error` named a limit below ours (now ours): the request should be split and resent."""
        if error.status not in (400, 413):
            return False
        if m := _TOO_MANY.search(error.message):
            limit = int(m.group(1))
            if 1 <= limit < self.max_images:
                self.max_images = limit
                return True
        if m := _TOO_BIG.search(error.message):
            limit = int(next(g for g in m.groups() if g))
            if limit < self.max_bytes:
                self.max_bytes = max(1024, limit - 64 * 1024)  # headroom for what the estimate misses
                return True
        return False


_TOO_MANY = re.compile(r"images in one request; the limit is (\d+)")
_TOO_BIG = re.compile(
    r"request body (?:is \d+ bytes; the limit is (\d+)|exceeds the limit of (\d+) bytes)"
    r"|larger than max \(\d+ vs\. (\d+)\)"
)
_IMAGE_INDEX = re.compile(r"^image (\d+)\b")


@dataclass(frozen=True)
class Send:
    """Send these images in one request; `timeout` is what is left of the request's deadline."""

    payloads: list[Payload]
    top_k: int | None
    timeout: float
    model: str | None = None
    version: str | None = None


def check_choice(step: Send, model: str, version: str) -> None:
    """A server that answered with another model or version than the one asked for (a server too
    old to know `model`/`version` answers with its default): an error, never a silent answer."""
    if (step.model and model != step.model) or (step.version and version != str(step.version)):
        asked = f"{step.model or 'the default model'}" + (f" v{step.version}" if step.version else "")
        raise QuickNetClientError(
            None,
            f"asked for {asked}, the server answered with {model} v{version}: "
            "it does not know model or version choice; upgrade the server",
        )


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Send | Sleep
Reply = list[Result] | QuickNetClientError | None
Plan = Generator[Step, Reply, dict[int, Result | QuickNetClientError]]


def split(indexes: Sequence[int], items: Sequence[Item], limits: Limits) -> list[list[int]]:
    """Consecutive groups under both limits; an image larger than the byte limit goes alone (the
    server then refuses that image, not its neighbours)."""
    groups: list[list[int]] = []
    group: list[int] = []
    size = 0
    for i in indexes:
        n = items[i].size + PART_OVERHEAD
        if group and (len(group) >= limits.max_images or size + n > limits.max_bytes):
            groups.append(group)
            group, size = [], 0
        group.append(i)
        size += n
    if group:
        groups.append(group)
    return groups


def _culprit(error: QuickNetClientError, sent: list[int]) -> int | None:
    """The caller's index of the image `error` is about, if it is about one image."""
    if error.status not in (400, 413, 415):
        return None
    if (m := _IMAGE_INDEX.match(error.message)) and 1 <= int(m.group(1)) <= len(sent):
        return sent[int(m.group(1)) - 1]
    if len(sent) == 1 and error.status == 413:  # one image over the body or message limit
        return sent[0]
    return None


# Raised for the whole call: no later request can do better (nobody answers, the key or the TLS
# setup is wrong, the request itself is malformed). Anything else fails only its own images.
def _concerns_the_call(error: QuickNetClientError) -> bool:
    return error.status is None or error.status in (400, 401, 403, 404, 413, 415)


def send_with_retry(
    payloads: list[Payload],
    top_k: int | None,
    timeout: float,
    retry: Retry,
    clock: Callable[[], float],
    choice: tuple[str | None, str | None] = (None, None),
) -> Generator[Step, Reply, list[Result] | QuickNetClientError]:
    """One request under one deadline, retried while the refusal says "later" and time is left."""
    deadline = clock() + timeout
    attempt = 0
    while True:
        attempt += 1
        reply = yield Send(payloads, top_k, max(deadline - clock(), 1e-3), *choice)
        if not isinstance(reply, QuickNetClientError):
            assert reply is not None
            return reply
        if not reply.retryable or attempt >= retry.attempts:
            return reply
        pause = retry.delay(attempt, reply.retry_after)
        if clock() + pause >= deadline:
            return reply
        yield Sleep(pause)


def classify_group(
    items: Sequence[Item],
    group: list[int],
    *,
    top_k: int | None,
    timeout: float,
    retry: Retry,
    limits: Limits,
    clock: Callable[[], float],
    return_exceptions: bool,
    choice: tuple[str | None, str | None] = (None, None),
) -> Plan:
    """Classify `items[i]` for i in `group`; returns {i: Result or error}. Raises the first error
    unless `return_exceptions`, and always raises an error that concerns the whole call."""
    out: dict[int, Result | QuickNetClientError] = {}
    loaded: dict[int, Payload] = {}
    pending = deque([group])

    def fail(index: int, error: QuickNetClientError) -> None:
        error.image = index
        if not return_exceptions:
            raise error
        out[index] = error
        loaded.pop(index, None)

    while pending:
        indexes = pending.popleft()
        parts = split(indexes, items, limits)
        if len(parts) > 1:  # a limit was learned since this group was planned
            pending.extendleft(reversed(parts))
            continue
        sent = []
        for i in indexes:
            if i not in loaded:
                try:
                    loaded[i] = items[i].load()
                except QuickNetClientError as e:
                    fail(i, e)
                    continue
            sent.append(i)
        if not sent:
            continue
        reply = yield from send_with_retry([loaded[i] for i in sent], top_k, timeout, retry, clock, choice)
        if isinstance(reply, list):
            if len(reply) != len(sent):
                raise QuickNetClientError(None, f"the server answered {len(reply)} results for {len(sent)} images")
            for i, result in zip(sent, reply, strict=True):
                out[i] = result
                loaded.pop(i)
            continue
        if len(sent) > 1 and limits.learn(reply):
            pending.appendleft(sent)
            continue
        culprit = _culprit(reply, sent)
        if culprit is not None:
            fail(culprit, reply)
            rest = [i for i in sent if i != culprit]
            if rest:
                pending.appendleft(rest)
            continue
        if not return_exceptions or _concerns_the_call(reply):
            raise reply
        for i in sent:  # a deadline, a refusal after every retry, a failed batch: these images only
            fail(i, reply.for_image(i))
    return out
