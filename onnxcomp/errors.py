"""The exception types the command line turns into exit codes, and the codes themselves.

0  success (the result was written, or the check passed)
1  a budget or self-check failed: --max-drop not met, a result onnxcomp measured as broken
2  the user's mistake: a bad file, option, recipe or data (OnnxcompError), one ``error:`` line
3  an internal error: a bug in onnxcomp or a library under it (``--debug`` shows the traceback)
130, 143  interrupted by SIGINT (Ctrl-C) or SIGTERM; temporary files are removed first
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class OnnxcompError(Exception):
    """A problem with what the user gave us; the CLI prints it as one line and exits 2.

    The message names the file, node, input or recipe key at fault.
    """


class CheckFailed(OnnxcompError):
    """The result was measured and failed its check (budget, self-check); the CLI exits 1."""


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler so that cleanup (``finally``) runs before exit 143.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` in library code lets it pass.
    """
