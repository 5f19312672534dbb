"""Decoding: `translate` and `generate` (api) over the greedy, beam and sampling searches
(search) and the logit rules (logits), the streaming forms (stream: `translate_iterable`,
`generate_tokens`, `translate_batches`), and the vocabulary shortlist (vmap: `VocabMap`).
Model-agnostic: a model is driven through its step interface only."""

from .api import DEFAULT_MAX_BATCH_SIZE, TranslationResult, generate, translate
from .search import length_penalty
from .stream import GenerationStepResult, generate_tokens, translate_batches, translate_iterable
from .vmap import VocabMap

__all__ = [
    "TranslationResult", "translate", "generate", "length_penalty", "DEFAULT_MAX_BATCH_SIZE",
    "translate_iterable", "translate_batches", "generate_tokens", "GenerationStepResult",
    "VocabMap",
]
