"""Exceptions that carry an exit code to the CLI.

UsageError covers everything the user can fix without changing code: bad flags, a config that
does not validate, an input whose schema lacks required columns. The CLI prints its message alone
(no traceback) and exits 2. Anything else is a failure at run time and exits 1.
"""


class UsageError(Exception):
    """Bad usage, configuration or input schema (exit code 2)."""


class ConfigError(UsageError):
    """The configuration is invalid: names the key, the file and what was expected."""


class InputSchemaError(UsageError):
    """The input lacks required columns or cannot be read as configured."""


class NonFiniteError(UsageError):
    """Features that are NaN or infinite: names each feature and how many users have such a value."""


class NotEnoughUsersError(UsageError):
    """The run has fewer users than an enabled model needs: names each model and how many it needs."""


class SourceUnavailableError(UsageError):
    """The stream's source cannot be reached or refuses the connection (an MQTT broker down, a wrong
    host, port or password): the user fixes the address or starts the broker."""
