"""LLM knowledge for the CRM: the prompts, greedy generation with the base LLM, text encoders."""
