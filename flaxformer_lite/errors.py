"""The one base class for errors a user can fix, on the ground floor of the package.

Every room's bad-input error derives from `UserError`: ConfigError (config.py), DataError
(data/), HFError (interop/), the inference engine's EngineError and the server's ApiError.
A command prints one `error: ...` line for any of them and exits with its `exit_status`;
the server answers with its `http_status`. So cli.py catches this base alone and needs no
room above it to know what bad input looks like.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # the exit status of every command for bad input (argparse's too)


class UserError(ValueError):
    """Bad input the user can fix; the message names the flag, key or file, and the fix.

    A ValueError, so code that catches ValueError around a library call keeps working.
    """

    exit_status = EXIT_BAD_INPUT
    http_status = 400


# A path the user named that is missing, or a file where a folder was wanted (or the other
# way round), is bad input as well: the OSError says which path.
BAD_INPUT = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
