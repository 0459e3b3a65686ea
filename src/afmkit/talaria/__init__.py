"""Talaria: the interactive latency, power and quality page that chooses each matrix's bits (issue 14)."""
