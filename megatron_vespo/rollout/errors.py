"""Errors of the rollout client; every message names the engine URL.

:class:`RolloutEngineError` is what callers catch (the loop turns it into a clear failure or a
retry); the subclasses say why: no connection, no answer in time, or an error status.
"""

class RolloutEngineError(RuntimeError):
    """The rollout engine failed a request; the message names the URL."""


class EngineUnreachableError(RolloutEngineError, ConnectionError):
    """No connection to the engine (not started, wrong URL, crashed)."""


class EngineTimeoutError(RolloutEngineError, TimeoutError):
    """The engine did not answer within the timeout."""


class EngineHTTPError(RolloutEngineError):
    """The engine answered with an error status."""

    def __init__(self, message: str, status_code: int, body: str):
        super().__init__(message)
        self.status_code = status_code
        self.body = body
