"""API keys: the key file, and the one check every front makes (`ApiKeys.allows`).

The file (`--api-keys-file`) holds one key per line; blank lines and `#` comments are skipped. A
line `sha256:<64 hex digits>` is a key stored hashed (`quicknet api-key` prints a new key and its
line), so the file need not hold the secret itself; any other line is the key as clients send it.
Keys are at least 16 characters, without spaces.

Clients send `Authorization: Bearer <key>` (REST) or `authorization: Bearer <key>` metadata (gRPC).
A presented key is hashed once and compared with every stored digest by `hmac.compare_digest`, all
of them each time, so neither the comparison nor the number of keys tried leaks through timing.
Keys are never logged. The file is re-read when it changes (checked at most once a second), so
keys rotate without a restart; a change that does not parse is logged and the old keys stay.

Roles: `--admin-api-keys-file` (same format) is the admin key set. Only its keys may use the
repository API's load and unload (`RepositoryGuard.check`); they are accepted on every other route
too. With API keys in force and no admin file, nobody may load or unload models.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from pathlib import Path

from quicknet.errors import QuickNetError
from quicknet.serve.errors import Forbidden, Unauthenticated

log = logging.getLogger("quicknet.auth")

HASHED = re.compile(r"sha256:([0-9a-f]{64})")
MIN_KEY_LENGTH = 16
RECHECK_S = 1.0


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hashed_line(key: str) -> str:
    """The key file line for `key`, stored hashed."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "qn_" + secrets.token_urlsafe(32)


def parse(text: str, source: str) -> list[bytes]:
    """The digests of the keys in a key file's text; QuickNetError (one line, no key in it) if malformed."""
    digests = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            match = HASHED.fullmatch(line)
            if not match:
                raise QuickNetError(f"{source}:{number}: a hashed key is 'sha256:' and 64 lowercase hex digits")
            digests.append(bytes.fromhex(match.group(1)))
        elif len(line) < MIN_KEY_LENGTH or any(c.isspace() for c in line):
            raise QuickNetError(f"{source}:{number}: a key needs at least {MIN_KEY_LENGTH} characters and no spaces")
        else:
            digests.append(digest(line))
    if not digests:
        raise QuickNetError(f"{source} holds no API key")
    return digests


def bearer(value: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` value, or None."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class ApiKeys:
    """The keys of one or more key files (`ApiKeys(api_keys_file, admin_api_keys_file)`: a key of
    either is accepted); each file re-read when it changes."""

    def __init__(self, path: Path, *more: Path | None):
        self.paths = [path, *(p for p in more if p is not None)]
        self.path = path
        self._stamp = self._stat()
        self._digests = self._read()
        self._checked = time.monotonic()

    def _stat(self) -> tuple:
        stamps = []
        for path in self.paths:
            try:
                st = path.stat()
            except OSError as e:
                raise QuickNetError(f"cannot read the API keys file {path}: {e.strerror}") from None
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _read(self) -> list[bytes]:
        digests = []
        for path in self.paths:
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise QuickNetError(f"cannot read the API keys file {path}: {e}") from None
            digests += parse(text, str(path))
        return digests

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._digests = self._read()
            log.info("API keys reloaded from %s: %d key(s)", ", ".join(map(str, self.paths)), len(self._digests))
        except QuickNetError as e:
            log.error("API keys not reloaded, the previous keys stay: %s", e)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header (or gRPC metadata) value carries a valid key."""
        self._refresh()
        key = bearer(authorization)
        presented = digest(key) if key is not None else b"\0" * 32
        ok = False
        for stored in self._digests:  # every digest, every time
            ok |= hmac.compare_digest(presented, stored)
        return ok and key is not None


FORBIDDEN = "loading and unloading models needs an admin API key (--admin-api-keys-file)"
NO_ADMIN_KEYS = "loading and unloading models is off: API keys are in force and this server has no admin keys"
UNAUTHENTICATED = "missing or invalid admin API key (send Authorization: Bearer <key>)"


class RepositoryGuard:
    """Who may load and unload models: `check(authorization)` returns (allowed) or raises
    `Unauthenticated` / `Forbidden` (401 / 403, gRPC UNAUTHENTICATED / PERMISSION_DENIED). No key
    files: everyone (as before roles). API keys without an admin file: nobody. An admin file: its
    keys only."""

    def __init__(self, api_keys_file: Path | None, admin_api_keys_file: Path | None):
        self.keys_in_force = api_keys_file is not None
        self.admin = ApiKeys(admin_api_keys_file) if admin_api_keys_file is not None else None

    def check(self, authorization: str | None) -> None:
        if self.admin is None:
            if self.keys_in_force:
                raise Forbidden(NO_ADMIN_KEYS)
            return
        if self.admin.allows(authorization):
            return
        if self.keys_in_force:  # the request passed the API key check: a key, but not an admin's
            raise Forbidden(FORBIDDEN)
        raise Unauthenticated(UNAUTHENTICATED)
