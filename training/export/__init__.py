"""Export trained artifacts as versioned model bundles the runtime can load."""

from service.bundle.writer import BundleWriter

__all__ = ["BundleWriter"]
