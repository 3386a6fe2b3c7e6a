"""LLM scoring: ReLLa-style prompts, P("Yes") from a causal LM, personalized LoRA, tiny test models."""
