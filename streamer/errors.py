"""The exception hierarchy: every error streamer raises on purpose derives from StreamerError."""


class StreamerError(Exception):
    """Root of the errors that streamer raises on purpose."""


class ConfigurationError(StreamerError):
    """A setting or command-line option has an invalid value."""


class BrokerError(StreamerError):
    """The Kafka broker could not be started, reached or used."""


class InvalidEventError(StreamerError):
    """An event failed validation; ``reason`` is the short text sent to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CheckpointError(StreamerError):
    """A checkpoint is missing, corrupt or does not match the running configuration."""


class SnapshotError(StreamerError):
    """A model snapshot failed export, validation or loading."""
