"""The one exception type the CLI turns into a clean one-line message."""


class LmkitError(Exception):
    """A problem the user can fix (bad file, bad option, unknown name).

    The message must name the file or option at fault and what to do about it; the CLI
    prints it without a traceback and exits non-zero.
    """
