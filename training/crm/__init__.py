"""Offline CRM training on the full training split."""
