"""Export trained artifacts as versioned model bundles the runtime can load."""

from training.export.bundle_writer import BundleWriter

__all__ = ["BundleWriter"]
