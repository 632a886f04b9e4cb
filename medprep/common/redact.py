"""Keep credentials out of logs, manifests and error messages."""

from __future__ import annotations

import logging
import os
import re

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

# user:password@ in URLs, and X-Amz-Signature / Credential query parameters of presigned URLs
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_SIGNED_QUERY = re.compile(
    r"(?P<key>X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=[^&\s]+",
    re.IGNORECASE,
)

_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (e.g. keys read from a credentials file)."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def known_secrets() -> list[str]:
    values = {os.environ.get(name) for name in SECRET_VARIABLES} | _extra_secrets
    # longest first so a secret containing another is replaced whole
    return sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)


def redact(text: str) -> str:
    """Replace known credential values, URL user-info and request signatures with ``***``."""
    for secret in known_secrets():
        text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNED_QUERY.sub(r"\g<key>=***", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the fully formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info:
            import traceback

            cleaned += "\n" + redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
            record.exc_text = None
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, ()
        return True
