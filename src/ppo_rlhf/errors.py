"""User-facing errors.

Anything the user can fix (bad data, bad config, missing file) raises `UserError` with a message
that names the place (file:line, config key) and says what to do. The CLI prints the message and
exits with status 2 -- no traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; `str(err)` is the whole message shown to them."""


class NonFiniteLossError(UserError):
    """Training produced too many non-finite losses or gradients in a row."""
