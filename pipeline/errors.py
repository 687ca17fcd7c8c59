"""The one base of every error a user can act on.

A `PipelineError` means the input, the configuration or a file is wrong, never the code: its
message names the file or config key and the reason. The command line prints such errors (and
missing files) as one `error: ...` line with exit status 2 instead of a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(ValueError):
    """Bad input, configuration or file; the message names it and says why."""


class StageOutputError(PipelineError):
    """A stage's output that is missing or malformed where a later stage (or the report) reads it;
    the message names the file and what is wrong with it."""
