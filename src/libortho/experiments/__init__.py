"""Experiments, one per seed claim: each a function from a frozen config to a result JSON."""
