"""The agent's exception family: each carries a message a person can act on."""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """Invalid configuration; the message names the key and where it came from."""


class IdentityError(AgentError):
    """The identity file exists but cannot be used."""


class RpcError(AgentError):
    """A request to a peer failed: the peer answered an error, broke the stream, or timed out."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
