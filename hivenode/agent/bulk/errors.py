"""The bulk transfer's one exception type."""

from hivenode.agent.errors import AgentError


class BulkError(AgentError):
    """A transfer failed: refused, tampered with, timed out, or the peer went away.

    `code` is short and stable (`refused`, `rejected`, `timeout`, `unreachable`, ...) so that a
    caller can decide to retry; `message` says what happened in words.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
