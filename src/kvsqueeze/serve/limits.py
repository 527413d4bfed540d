"""Who may call the server and how many requests may wait: API keys and the waiting-queue bound.

Keys come from ``--api-key`` (visible in ``ps``), a file (``--api-key-file``: one key per line,
blank lines and ``#`` comments skipped) and the ``KVSQUEEZE_API_KEYS`` environment variable
(comma-separated); any of them is accepted. A caller's scope, which separates the contexts of
different keys, is a hash of its key, so no key is ever stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

ENVIRONMENT_VARIABLE = "KVSQUEEZE_API_KEYS"
PUBLIC_SCOPE = "public"
# the Retry-After of a 429 or 503: how long a refused client waits at least before trying again
RETRY_AFTER_SECONDS = 1


class AuthError(Exception):
    """A request without a valid API key (the message says which case)."""


def load_api_keys(
    given: Sequence[str] = (), key_file: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """Every accepted key, in order, without duplicates; ``ValueError`` for a file that cannot be
    read or holds no key."""
    keys = [key.strip() for key in given if key.strip()]
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read --api-key-file {key_file}: {error}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"--api-key-file {key_file} holds no key (one key per line)")
        keys += from_file
    variable = (environ if environ is not None else {}).get(ENVIRONMENT_VARIABLE, "")
    keys += [key.strip() for key in variable.split(",") if key.strip()]
    return tuple(dict.fromkeys(keys))


def scope_of(keys: Sequence[str], authorization: str) -> str:
    """The caller's scope from its ``Authorization`` header; ``AuthError`` when keys are required
    and the header has none of them."""
    if not keys:
        return PUBLIC_SCOPE
    given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if not given:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise AuthError("invalid API key")
    return hashlib.sha256(b"kvsqueeze-scope:" + given.encode()).hexdigest()[:16]


def queue_full(waiting: int, max_waiting: int) -> str | None:
    """Why a new request cannot wait (``max_waiting`` already wait), or None; 0 = unbounded."""
    if max_waiting and waiting >= max_waiting:
        return (
            f"{waiting} requests are already waiting for the model (the server's --max-waiting is "
            f"{max_waiting}); retry after {RETRY_AFTER_SECONDS} s"
        )
    return None
