"""Per-user adapters: gate on the CRM user representation, materialize, cache."""
