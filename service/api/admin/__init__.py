"""Model administration: /admin/v1 (push, validate, activate, roll back, delete versions)."""
