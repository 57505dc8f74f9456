"""The one exception type for bad user input: the CLI prints its message, not a traceback."""


class ConfigError(ValueError):
    """A setting, file or model that cannot work; the message names the value and what was expected."""
