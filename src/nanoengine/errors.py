"""The errors nanoengine raises on purpose.

Each derives from the built-in exception a caller would naturally catch (`ValueError` for bad
input, `TimeoutError` for a deadline), so code that knows nothing of nanoengine still handles them.
"""


class NanoEngineError(Exception):
    """Base class of every error raised by nanoengine on purpose."""


class InvalidParameterError(NanoEngineError, ValueError):
    """A request parameter is out of range or of the wrong type."""


class UnknownModelError(NanoEngineError, ValueError):
    """A model name is neither registered nor a checkpoint folder."""


class CheckpointError(NanoEngineError, ValueError):
    """A checkpoint folder or file is missing, malformed or does not fit the model."""


class FetchError(NanoEngineError, RuntimeError):
    """Downloading or converting a registered model's weights failed."""


class RequestTimeoutError(NanoEngineError, TimeoutError):
    """A request ran past its timeout."""

    @classmethod
    def ran_out(cls, timeout: float, done: int, max_new_tokens: int, doing: str) -> "RequestTimeoutError":
        return cls(f"the request ran past its timeout of {timeout:g} s while {doing} ({done} of {max_new_tokens} tokens generated)")
