"""``POST /v1/explain``: router (HTTP), protocol (wire types), serving (logic)."""
