"""Corpora, token blocks and synthetic private records."""

from libortho.data.blocks import calibration_blocks, split_documents, token_blocks, tokenize_stream
from libortho.data.corpora import CORPORA, fortune_texts, load_corpus, read_text_files, shakespeare_texts

__all__ = ["CORPORA", "calibration_blocks", "fortune_texts", "load_corpus", "read_text_files", "shakespeare_texts",
           "split_documents", "token_blocks", "tokenize_stream"]
