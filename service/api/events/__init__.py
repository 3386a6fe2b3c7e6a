"""Behaviour events and user profiles into the history store: router, protocol, serving."""
