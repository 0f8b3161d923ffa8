"""One exception type for mistakes a user can fix, and the wrapper that turns it into a message.

Scripts raise `UserError("what is wrong. What to do.")` for bad input; `run_main` prints it as one
paragraph on stderr and exits with status 2, so users never see a traceback for their own mistakes.
Real bugs still raise normally and show a traceback.
"""

from __future__ import annotations

import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input, files or machine, with a message saying how to fix it."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; on UserError print the message and exit 2, on Ctrl-C exit 130 quietly. Anything
    else is a bug, not the user's mistake: its traceback is printed with a line asking for a report, exit 1."""
    try:
        main(argv)
    except UserError as e:
        print(textwrap.fill(f"error: {e}", width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug: reported with its traceback, never hidden behind a diagnosis
        traceback.print_exc()
        print(
            f"\nbug: nanogpt stopped on an unexpected {type(e).__name__}. This is not a mistake in your input; please "
            "report it with the traceback above and the command you ran.",
            file=sys.stderr,
        )
        sys.exit(1)
