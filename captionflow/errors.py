"""User-facing errors: one line that says what is wrong and where."""

import contextlib
import sys


class CaptionflowError(Exception):
    """A problem with the user's inputs or configuration (not a bug in captionflow).

    The message is a single line naming the offending file/record/key and the reason.
    """


@contextlib.contextmanager
def one_line_errors():
    """Turn a CaptionflowError into one `error: ...` line on stderr and exit status 1.

    Workflow scripts wrap their library call in this, so a rule's log ends with a line a
    user can act on instead of a traceback. Any other exception is a bug and keeps its
    traceback.
    """
    try:
        yield
    except CaptionflowError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
