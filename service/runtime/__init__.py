"""The loaded model bundle and the objects the request path needs from it."""
