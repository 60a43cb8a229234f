"""Exception types for user mistakes: the CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
  """Bad input from a user: the message says what was wrong, where, and what is allowed."""


class SettingError(UserError, ValueError):
  """An environment variable that lopt reads holds a value it does not allow; the message names both."""


class CheckpointError(UserError, ValueError):
  """A file is missing, truncated, altered or of the wrong architecture; the message names the file and problem.

  Defined here rather than in ``lopt.io.checkpoint`` (which re-exports it) so that the architecture specs, which
  ``lopt.io.checkpoint`` imports, can raise it too.
  """
