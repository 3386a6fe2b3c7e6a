"""The vLLM scoring engine: remote vLLM servers with per-user adapters."""
