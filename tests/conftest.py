"""Shared test setup: this directory is on sys.path, so tests import helpers such as redis_support."""
