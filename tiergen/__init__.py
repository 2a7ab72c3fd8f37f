"""tiergen: throughput-oriented LLM inference over GPU, host RAM and disk."""
from .config import ModelConfig
from .errors import (CheckpointError, DiskFullError, InvalidRequestError, ModelNotFoundError,
                     PolicyDoesNotFitError, PromptTooLongError, TiergenError, UnknownModelError)
from .llm import LLM, Perplexity, Score
from .policy import Policy
from .sampling import SamplingParams
from .sequence import Output

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "Policy", "ModelConfig", "PolicyDoesNotFitError", "DiskFullError", "Output", "Score", "Perplexity", "TiergenError",
           "ModelNotFoundError", "UnknownModelError", "CheckpointError", "PromptTooLongError",
           "InvalidRequestError"]
