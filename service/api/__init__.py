"""The HTTP layer: one folder per endpoint family (router / protocol / serving), composed in ``app``."""

from service.api.app import build_app

__all__ = ["build_app"]
