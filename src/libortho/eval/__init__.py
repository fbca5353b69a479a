"""Evaluation metrics (perplexity, and later canaries, exposure, MIA, reasoning)."""

from libortho.eval.perplexity import PerplexityResult, perplexity, token_nll

__all__ = ["PerplexityResult", "perplexity", "token_nll"]
