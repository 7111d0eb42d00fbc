"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class RaysemiError(Exception):
    """An error the user can fix (bad input, bad config, missing data). Its message is one line."""


class ConfigError(RaysemiError):
    """A config key, value or file is invalid."""


class DataError(RaysemiError):
    """A dataset root, split, image or mask is missing or inconsistent."""


class CheckpointError(RaysemiError):
    """A checkpoint is missing, corrupt or incompatible with the run."""


class RaysemiWarning(UserWarning):
    """Something the user should look at that does not stop the command; the CLI prints it as one line."""
