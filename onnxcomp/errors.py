"""The one exception type for a user's mistakes (bad file, bad option, data that do not fit)."""


class OnnxcompError(Exception):
    """A problem with what the user gave us; the CLI prints it as one line and exits 2.

    The message names the file, node, input or recipe key at fault.
    """
