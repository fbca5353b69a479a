"""Figures and Markdown / self-contained HTML reports rendered from experiment result JSON."""
