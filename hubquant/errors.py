"""Error types. Each carries the CLI exit code scripts (and the GitHub Action) branch on.

Exit codes: 2 usage/config, 3 auth/gated, 4 not found, 5 unsupported/missing dependency,
6 quality gate, 7 conflict (target holds another base / concurrent commit), 1 anything else.
"""
from __future__ import annotations


class HubquantError(Exception):
    """Root of hubquant's errors. `hint` names the fix; the CLI prints `message` then `hint`."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(HubquantError, ValueError):
    """Bad flags, bad combination of options, bad config."""

    exit_code = 2


class AuthError(HubquantError, PermissionError):
    """Missing/invalid token, gated or private repo without access, no write permission."""

    exit_code = 3


class NotFoundError(HubquantError, LookupError):
    """Repo, revision or file does not exist."""

    exit_code = 4


class HubUnreachableError(HubquantError, ConnectionError):
    """The Hub cannot be reached, or accepted the connection and did not answer in time (transient)."""

    exit_code = 4


class UnsupportedError(HubquantError, NotImplementedError):
    """Architecture, format or file type hubquant cannot handle, or a missing optional dependency."""

    exit_code = 5


class QualityGateError(HubquantError):
    """The variant's quality is below the gate the user set (nothing was pushed)."""

    exit_code = 6


class ConflictError(HubquantError):
    """The target repo holds a variant of another base model, or the branch moved under us."""

    exit_code = 7


class CorruptFileError(HubquantError, ValueError):
    """A downloaded file cannot be parsed (e.g. a truncated safetensors shard)."""

    exit_code = 4


def missing_dependency(package: str, extra: str | None = None, why: str = "") -> UnsupportedError:
    """An UnsupportedError that says which pip command fixes it."""
    cmd = f"pip install 'hubquant[{extra}]'" if extra else f"pip install {package}"
    what = f" ({why})" if why else ""
    return UnsupportedError(f"the Python package '{package}' is not installed{what}", hint=f"run: {cmd}")
