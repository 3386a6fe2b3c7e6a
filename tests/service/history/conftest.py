"""A scratch key prefix for every history test that asks for one."""

from __future__ import annotations

import pytest
from tests.redis_support import scratch_prefix


@pytest.fixture
def prefix():
    with scratch_prefix() as value:
        yield value
