"""Offline LLM knowledge: generate item and user texts with the base LLM, encode them into vectors."""
