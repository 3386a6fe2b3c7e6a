"""``GET /v1/users/{user_id}/history``: what the history store holds for a user (router, protocol, serving)."""
