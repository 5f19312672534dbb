"""Decoding: `translate` and `generate` (api) over the greedy, beam and sampling searches
(search). Model-agnostic: a model is driven through its step interface only."""

from .api import DEFAULT_MAX_BATCH_SIZE, TranslationResult, generate, translate
from .search import length_penalty

__all__ = ["TranslationResult", "translate", "generate", "length_penalty", "DEFAULT_MAX_BATCH_SIZE"]
