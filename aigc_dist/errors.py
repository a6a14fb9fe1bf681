"""The failures a user can act on, and the exit status each gives a command line or Ray job.

A `UserError`'s message says what to change, so entry points print it without a traceback and exit
with its `exit_code`; anything else is a bug or an outage and is reported with its traceback.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_RUN_LOCKED = 4


class UserError(Exception):
    """A failure whose message names what to fix (a field, a location, a run)."""

    exit_code = EXIT_FAILED
