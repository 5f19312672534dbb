"""Translation quality: BLEU and chrF (sacrebleu, optional) and exact match."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["score_translations"]


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and chrF (sacrebleu) and exact-match accuracy, in percent. BLEU uses character
    tokenisation when the references are single words (compounds, as in the number demo)."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses: {len(hypotheses)} lines but references has {len(references)}"
        )
    if not references:
        raise ValueError("references: nothing to score")
    matches = sum(h == r for h, r in zip(hypotheses, references, strict=True))
    exact = 100.0 * matches / len(references)
    try:
        import sacrebleu
    except ImportError:
        return {"exact_match": exact}
    one_word = all(len(r.split()) <= 1 for r in references)
    tokenize = "char" if one_word else "13a"
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score, "exact_match": exact, "bleu_tokenize": tokenize}
