"""Store errors as data (stable codes), the fault policy's settings, and secrets kept out of messages."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

# Store-fault policy (see the README's "Object stores" section): each request gets these connect
# and read timeouts, transient faults are retried this many times with exponential backoff.
STORE_TIMEOUT_ENV = "CURATOR_STORE_TIMEOUT"
STORE_RETRIES_ENV = "CURATOR_STORE_RETRIES"
DEFAULT_STORE_TIMEOUT_S = 30.0
DEFAULT_STORE_RETRIES = 4
# Storage options that are this project's own (taken out before the rest go to fsspec).
STORE_TIMEOUT_OPTION = "store_timeout"
STORE_RETRIES_OPTION = "store_retries"

# Stable codes of StorageError (the README's table lists them).
STORE_ERROR = "store_error"  # anything else the store refused (the message says what)
STORE_NOT_FOUND = "store_not_found"  # no such bucket, folder or object
STORE_DENIED = "store_denied"  # 401/403, wrong or missing credentials
STORE_UNAVAILABLE = "store_unavailable"  # 5xx, resets, truncated bodies: still failing after the retries
STORE_TIMEOUT = "store_timeout"  # no answer within the timeout, after the retries
STORE_WRITE_FAILED = "store_write_failed"  # a local location that cannot be written


class StorageError(OSError):
    """A dataset location that cannot be listed, read or written; the message names it (never a
    credential) and ``code`` is one of the stable ``STORE_*`` codes."""

    def __init__(self, message: str, code: str = STORE_ERROR):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.code))


class UnsafeKeyError(ValueError):
    """A shard path that cannot be a Dagster partition key."""


_SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "connection_string", "account_key", "sas_token",
                        "credential", "client_secret", "session_token", "aws_secret_access_key")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "GCS_TOKEN")
_SECRET_PATTERNS = re.compile(
    r"(AccountKey=)[^;\s]+|(\b(?:sig|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature)=)[^&\s'\",;]+",
    re.IGNORECASE,
)


def secret_values(options: dict[str, Any]) -> tuple[str, ...]:
    """Credential values that must never appear in a message: from the options and the environment."""
    found = []
    for name, value in options.items():
        if isinstance(value, str) and any(s in name.lower() for s in _SECRET_OPTION_NAMES):
            found.append(value)
    found += [os.environ[n] for n in _SECRET_ENV if os.environ.get(n)]
    parts = []
    for v in found:  # a connection string's key, on its own too
        parts += [m.group(1) for m in re.finditer(r"AccountKey=([^;]+)", v)]
    return tuple(sorted({v for v in found + parts if len(v) >= 6}, key=len, reverse=True))


def redact(text: str, secrets: Any = ()) -> str:
    """``text`` with credential values and URL signatures replaced by ``***``."""
    if isinstance(secrets, dict):
        secrets = secret_values(secrets)
    for value in secrets:
        text = text.replace(value, "***")
    return _SECRET_PATTERNS.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


_DENIED_NAMES = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                 "DefaultCredentialsError", "ClientAuthenticationError", "RefreshError", "TransportError")
_TRANSIENT_NAMES = ("Connect", "ClientOSError", "Payload", "Incomplete", "Disconnect", "Streaming", "ServiceRequest",
                    "ServiceResponse", "ResponseParser", "ProxyError", "ChunkedEncoding", "HTTPClientError")


_TRANSIENT_ERRNOS = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT)


# A body cut short or a connection dropped mid-answer (aiohttp, botocore, azure-core, urllib3).
_CUT_SHORT_NAMES = ("Payload", "ContentLength", "Incomplete", "Disconnect", "Streaming", "ChunkedEncoding")


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def classify(exc: BaseException) -> tuple[str, bool]:
    """(code, transient) for an exception a store client raised (its cause chain included)."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    for e in chain:
        name = type(e).__name__
        if isinstance(e, FileNotFoundError) or name in ("NoSuchBucket", "NoSuchKey", "ResourceNotFoundError"):
            return STORE_NOT_FOUND, False
        if isinstance(e, PermissionError) or name in _DENIED_NAMES or str(e).startswith("Forbidden"):
            return STORE_DENIED, False
        if any(part in name for part in _CUT_SHORT_NAMES):  # aiohttp's carry a made-up status 400
            return STORE_UNAVAILABLE, True
        status = _status_of(e)
        if status is not None:
            if status in (401, 403):
                return STORE_DENIED, False
            if status == 404:
                return STORE_NOT_FOUND, False
            if status in (408, 429) or status >= 500:
                return STORE_UNAVAILABLE, True
            if status >= 400:
                return STORE_ERROR, False
    for e in chain:
        name = type(e).__name__
        if isinstance(e, TimeoutError) or "Timeout" in name:
            return STORE_TIMEOUT, True
        if isinstance(e, ConnectionError) or getattr(e, "errno", None) in _TRANSIENT_ERRNOS or any(
            part in name for part in _TRANSIENT_NAMES
        ):
            return STORE_UNAVAILABLE, True
    return STORE_ERROR, False


CODE_WORDS = {
    STORE_NOT_FOUND: "no such object or bucket", STORE_DENIED: "access denied (check the credentials)",
    STORE_UNAVAILABLE: "the store keeps failing", STORE_TIMEOUT: "the store did not answer in time",
    STORE_ERROR: "the store refused the request",
}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


