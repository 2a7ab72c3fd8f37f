"""tiergen: throughput-oriented LLM inference over GPU, host RAM and disk."""
from .config import ModelConfig
from .errors import (CheckpointError, InvalidRequestError, ModelNotFoundError, PromptTooLongError,
                     TiergenError, UnknownModelError)
from .llm import LLM, Perplexity, Score
from .sampling import SamplingParams
from .sequence import Output

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "ModelConfig", "Output", "Score", "Perplexity", "TiergenError",
           "ModelNotFoundError", "UnknownModelError", "CheckpointError", "PromptTooLongError",
           "InvalidRequestError"]
