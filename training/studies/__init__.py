"""Offline studies that train many models and compare them on one protocol (``reclora sample-efficiency``)."""
