"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits with code 2."""


class UserError(Exception):
  """Bad input from a user: the message says what was wrong, where, and what is allowed."""
