"""The HTTP layer: one folder per endpoint family (router / protocol / serving), composed in ``app``;
``wiring`` builds the production parts from settings."""

from service.api.app import build_app
from service.api.wiring import create_app

__all__ = ["build_app", "create_app"]
