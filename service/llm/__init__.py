"""The LLM side both training and serving share: ReLLa-style prompts with Yes/No answer tokens,
personalized LoRA (meta-LoRA banks, gates, mixing), precision choice."""
