"""The error type of the LID release loader."""

from __future__ import annotations

from pipeline.errors import PipelineError


class LidFormatError(PipelineError):
    """A LID release folder (config or checkpoint) that this loader cannot use faithfully.

    Messages always name the file and the key or reason, so a user can fix the folder.
    """
