"""``POST /v1/score``: router (HTTP), protocol (wire types), serving (logic)."""
