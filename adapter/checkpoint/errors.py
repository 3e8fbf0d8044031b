"""The checkpoint bridge's one error type."""


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt or inconsistent; the message names the file and tensor."""
