"""Text: tokenizers (characters, SentencePiece) and translation metrics (BLEU, chrF, exact
match)."""
