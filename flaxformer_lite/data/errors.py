"""The one exception the data package raises for bad input."""

from flaxformer_lite.errors import UserError


class DataError(UserError):
    """Bad or missing input data; the message names the file (and line) and the fix."""
