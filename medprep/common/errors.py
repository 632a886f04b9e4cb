"""Errors that describe bad input in one line: which sample, which file, what is wrong."""

from __future__ import annotations


class InputError(Exception):
    """Bad or unusable input. ``str()`` is the one line shown to the user.

    ``sample`` and ``path`` may be filled in later by the caller that knows them
    (engines often know the file but not the sample name). Bad input is deterministic:
    Snakemake's retries do not redo it, unless ``retryable``. ``kind`` names what the
    failure record calls it (subclasses: a full destination is not bad input).
    """

    kind = "input"

    def __init__(
        self,
        cause: str,
        *,
        path: str | None = None,
        sample: str | None = None,
        retryable: bool = False,
    ):
        super().__init__(cause)
        self.cause = cause
        self.path = path
        self.sample = sample
        # True when trying again may succeed (the source changed while it was read);
        # otherwise a retry of the job in the same run fails at once (medprep.workflow.runner)
        self.retryable = retryable

    def with_context(self, *, sample: str | None = None, path: str | None = None) -> InputError:
        self.sample = self.sample or sample
        self.path = self.path or path
        return self

    def __str__(self) -> str:
        parts = []
        if self.sample:
            parts.append(f"sample {self.sample}")
        if self.path:
            parts.append(f"file {self.path}")
        parts.append(self.cause)
        return ": ".join(parts)


# A sample's problem met while Snakemake builds the DAG (an input or fingerprint function)
# must not stop every sample: the function returns this marker instead of raising, and the
# sample's `download` job turns it back into the error, so that sample alone fails.
DEFERRED_PREFIX = "medprep-deferred-error:"


def defer(error: BaseException, *, path: str | None = None) -> str:
    """A parameter value that carries ``error`` to the sample's download job (see ``undefer``).

    An ``InputError`` keeps its file and cause; any other exception becomes a cause naming
    its type, so a bug in a fingerprint function fails its sample with one line too.
    """
    import json

    from medprep.common.redact import redact

    if isinstance(error, InputError):
        cause, where = error.cause, error.path or path
    else:
        cause, where = f"unexpected {type(error).__name__}: {error}", path
    payload = {"cause": redact(cause), "path": redact(where) if where else None}
    return DEFERRED_PREFIX + json.dumps(payload, sort_keys=True)


def undefer(value: object, note: str = " (found when the run started)") -> InputError | None:
    """The ``InputError`` that ``defer`` encoded in ``value``, or None for any other value.

    ``note`` is added to the cause: the download job reports what the main process found.
    """
    import json

    if not isinstance(value, str) or not value.startswith(DEFERRED_PREFIX):
        return None
    payload = json.loads(value[len(DEFERRED_PREFIX) :])
    return InputError(f"{payload['cause']}{note}", path=payload["path"])
