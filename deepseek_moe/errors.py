"""Errors caused by the user's input or files (config, data, tokenizer, checkpoints, exports).

Raise one of these when the user can fix the cause: the message is one line naming what was
expected, what was found and what to change. Entry points report them as `<kind>: <message>` on
stderr with a non-zero exit and no traceback. Anything else is a programming error and keeps its
traceback.
"""


class UserError(Exception):
    """Base class: a problem with the user's input that the message tells them how to fix."""

    kind = "Error"

    def one_line(self) -> str:
        """`<kind>: <message>` on a single line (newlines folded), as printed on stderr."""
        text = " ".join(str(self).split())
        return f"{self.kind}: {text}"


class ConfigError(UserError, ValueError):
    kind = "Config error"


class DataError(UserError):
    kind = "Data error"


class CheckpointError(UserError):
    kind = "Checkpoint error"


class ExportError(UserError):
    kind = "Export error"
