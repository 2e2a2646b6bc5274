"""The base of the errors dsv3 raises for bad input (a config field, a file, a setting, a request).

Each layer has its own subclass (`ConfigError`, `CheckpointError`, `RunError`, `TokenizerError`, `DataError`,
`TrainError`, `GenerationError`); every message names the culprit. The CLI prints any of them as
`dsv3 COMMAND: error: MESSAGE` and exits with status 2, never with a traceback.
"""


class Dsv3Error(Exception):
    """Bad input that the user can fix; the message names the field, tensor, file or setting."""
