"""The ML engineer's side of the admin API: an HTTP client and the `reclora` commands on it."""
