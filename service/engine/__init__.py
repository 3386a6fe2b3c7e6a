"""Scoring engines: given one user's adapter, a shared prompt prefix and candidate suffixes, P(Yes)."""
