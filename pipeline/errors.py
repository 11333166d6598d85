"""One-line error messages: the single formatter every edge (CLI, stages, flows) uses.

The pipeline's rule is that bad input ends in ONE line naming the cause. Exceptions from
libraries often carry several (Ray lists every worker's traceback before the summary; DALI
prints a multi-line "Critical error in pipeline"), so the edges reduce them here.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["one_line", "os_error_line", "os_error_reason"]


def one_line(
    err: BaseException | str, *, pick: Literal["first", "last"] = "first", limit: int | None = 300
) -> str:
    """The first (or last) non-blank line of an error, whitespace-collapsed and capped.

    ``pick="last"`` suits errors that put their summary after a dump (Ray's TrainingFailedError,
    a Tune trial's error). An empty message falls back to the exception's type name.
    """
    text = str(err)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if lines:
        line = lines[0] if pick == "first" else lines[-1]
    else:
        line = type(err).__name__ if isinstance(err, BaseException) else "unknown error"
    if limit is not None and len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line


def os_error_reason(err: OSError) -> str:
    """The reason alone (``Permission denied``), for messages that name the path themselves."""
    return err.strerror or one_line(err)


def os_error_line(err: OSError) -> str:
    """``<path>: <reason>`` for a file-system error (no space left, permission denied, ...)."""
    reason = os_error_reason(err)
    if err.filename is not None:
        target = f" -> {err.filename2}" if getattr(err, "filename2", None) else ""
        return f"{err.filename}{target}: {reason}"
    return reason
