"""Exception types. Every user mistake raises a subclass of TiergenError, which
the CLI turns into a one-line message and a non-zero exit."""


class TiergenError(Exception):
    """Base class for errors caused by input rather than by a bug. ``prompt_index``: the
    prompt (0-based, in the order given) the error is about, where it is about one."""

    def __init__(self, *args: object, prompt_index: int | None = None) -> None:
        super().__init__(*args)
        self.prompt_index = prompt_index


class ModelNotFoundError(TiergenError, FileNotFoundError):
    """A model path, name or cache entry that does not exist."""


class UnknownModelError(TiergenError, ValueError):
    """A model name or architecture tiergen does not know."""


class CheckpointError(TiergenError, ValueError):
    """A checkpoint file that is truncated, corrupt or of the wrong format."""


class PromptTooLongError(TiergenError, ValueError):
    """A prompt that does not fit in the model's context window."""


class InvalidRequestError(TiergenError, ValueError):
    """Bad generation arguments: sampling parameters, prompts, dtype/device."""


class DiskFullError(TiergenError, OSError):
    """The offload directory's file system has no room for what must go there."""


class PolicyDoesNotFitError(TiergenError, MemoryError):
    """A placement policy whose tensors exceed a tier's byte budget."""
