"""The one exception type for mistakes in the user's data or options."""


class DataError(ValueError):
    """A problem with the user's interaction log or data options.

    The message is a single line that names the problem and how to fix it; the command line prints
    it without a traceback.
    """
