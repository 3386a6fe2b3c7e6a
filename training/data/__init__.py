"""Dataset loading, validation and CTR sample preparation."""
