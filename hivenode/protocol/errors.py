"""The one exception type of the wire layer."""


class ProtocolError(Exception):
    """Malformed, oversized or unsupported input from the wire; the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
