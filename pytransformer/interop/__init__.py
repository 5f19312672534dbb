"""Bring in the models people already have, and hand ours to CTranslate2.

`from_marian(DIR)`: a Hugging Face Marian (OPUS-MT) model directory -> `Translator`.
`from_ctranslate2(DIR)`: a CTranslate2 Transformer model directory -> `Translator`.
`export_ctranslate2(MODEL_DIR, OUT)`: a translator directory -> a CTranslate2 model directory.

None of them needs PyTorch, Transformers or CTranslate2 (a Marian model given only as
pytorch_model.bin needs torch to be read).
"""

from .ctranslate2 import export_ctranslate2, from_ctranslate2
from .marian import from_marian

__all__ = ["from_marian", "from_ctranslate2", "export_ctranslate2"]
