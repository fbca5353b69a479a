"""Evaluation: perplexity, canary extraction, exposure, membership inference, and the privacy harness."""

from libortho.eval.perplexity import PerplexityResult, perplexity, token_nll

__all__ = ["PerplexityResult", "perplexity", "token_nll"]
