"""Conventional recommender (CRM): SIM-style search over a long ID history, then DIN attention."""
