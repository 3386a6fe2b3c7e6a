"""The model registry of a running service: store on disk, uploads, validation, activation."""
