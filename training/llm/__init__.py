"""The LLM side of training: the base model directory, prompts for samples, LoRA training, reports."""
