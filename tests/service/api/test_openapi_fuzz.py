"""Schema fuzzing: every operation of the published OpenAPI document, driven with requests drawn
from the document itself (schemathesis, in-process over ASGI) against the real app, FormulaScorer
and the real Redis.

Schema-valid requests: about half are the document's own, half realistic (catalog items 1..100,
ratings in range, recent timestamps, users with histories, real cursors), so the success paths
run and not only the refusals. Checks: no 5xx; status, content type, headers and body conform to
the document; no such request is refused except by the catalog (422 ``unknown_item``), the
configured limits, and the documented time order of events (422 in a batch, 409 against the
stored history). Schema-invalid requests: each is refused, as a 422 in the error schema.

The admin routes are not in the document: ``admin_enabled`` needs a runtime with a model manager,
so they are not fuzzed here (their own tests cover them).
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from tests.service.api.api_support import KNOWN_ITEMS, FormulaScorer
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from service.api import build_app
from service.config import Settings

MAX_EXAMPLES = 40  # schema-invalid cases per operation, twice as many valid ones: about 20 s in all
FUZZED = ("GET /livez", "GET /readyz", "POST /v1/score", "POST /v1/events", "PUT /v1/users/{user_id}/profile",
          "GET /v1/users/{user_id}/history")
WITHOUT_INPUT = ("GET /livez", "GET /readyz")  # a handful of distinct requests exhausts these
SEEDED_USERS = ("alice", "bob", "196")  # users with a stored history and profile before the run
EVENT = r"events\[\d+\]"
# (status, detail type, where): what may refuse a schema-valid request.
ALLOWED_REFUSALS = [
    (422, "unknown_item", r".*"),  # an item the catalog does not know
    (422, "too_long", r"candidates|events"),  # max_candidates, max_event_batch
    (422, "less_than_equal", r"deadline_ms"),  # max_deadline_ms
    (422, "out_of_range", EVENT + r"\.rating"),  # rating_min, rating_max
    (422, "in_future", EVENT + r"\.timestamp"),  # max_event_future_s
    (422, "out_of_order", EVENT + r"\.timestamp"),  # a batch not oldest first
    (409, "out_of_order", r""),  # events older than the user's latest stored one
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def value_at(body: Any, loc: str | None) -> Any:
    """The request body's value at an error location such as ``events[0].timestamp``."""
    value = body
    for index, name in re.findall(r"\[(\d+)\]|([^.\[\]]+)", loc or ""):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def refusals_are_documented(ctx: Any, response: Any, case: Any) -> None:
    """A schema-valid request is answered 2xx, or refused only as ``ALLOWED_REFUSALS`` says.

    One more refusal is by design: JSON Schema counts ``60.0`` as an integer, the wire does not
    (ids are integer literals, see ``service.api.fields``), so a whole float where the document says
    integer may be refused at its own location."""
    if response.status_code < 400:
        return
    error = response.json()["error"]
    details = error["details"] or [{"loc": None, "type": error["code"]}]
    unexpected = [d for d in details if not is_whole_float(value_at(case.body, d["loc"])) and not any(
        status == response.status_code and kind == d["type"] and re.fullmatch(where, d["loc"] or "")
        for status, kind, where in ALLOWED_REFUSALS)]
    assert not unexpected, f"{case.method} {case.formatted_path} refused a schema-valid request: {error}"


def is_whole_float(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis' caches go to a temporary directory, not a ``.hypothesis`` in the work tree."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@dataclass
class Gateway:
    app: FastAPI
    cursors: list[str]  # next_cursor values of real pages of the seeded users


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    """The app with its lifespan running on schemathesis' event loop (the store's connections live
    there), seeded users, stopped afterwards."""
    scorer = FormulaScorer()
    app = build_app(settings, scorer=scorer)
    cursors = []
    with asgi.get_client(app) as client:  # starts the lifespan: the history store is built now
        scorer.history = app.state.history
        now = int(time.time())
        for user in SEEDED_USERS:
            events = [{"item_id": i, "rating": 1.0 + (i % 9) / 2, "timestamp": now - 100_000 + i} for i in range(1, 60)]
            assert client.post("/v1/events", json={"user_id": user, "events": events}).status_code == 200
            assert client.put(f"/v1/users/{user}/profile", json={"profile": {"age": "24"}}).status_code == 200
            for limit in (5, 25):
                cursors.append(client.get(f"/v1/users/{user}/history", params={"limit": limit}).json()["next_cursor"])
    try:
        yield Gateway(app, cursors)
    finally:
        asgi.shutdown_lifespans()


def realistic(label: str, data: st.DataObject, case: Any, clock: Iterator[int], cursors: list[str]) -> None:
    """Overwrite the drawn case with values that pass the catalog and the configured limits."""
    users = st.one_of(st.sampled_from(SEEDED_USERS), st.integers(0, 10**6), st.from_regex(r"\Au[a-z0-9]{1,8}\Z"))
    if label == "POST /v1/score":
        case.body = {"user_id": data.draw(users),
                     "candidates": data.draw(st.lists(st.sampled_from(KNOWN_ITEMS), min_size=1, max_size=20,
                                                      unique=True)),
                     "deadline_ms": data.draw(st.none() | st.integers(1, 10_000))}
    elif label == "POST /v1/events":
        n = data.draw(st.integers(1, 10))
        start = next(clock)  # later than every earlier batch: appends, not conflicts
        case.body = {"user_id": data.draw(users),
                     "events": [{"item_id": data.draw(st.sampled_from(KNOWN_ITEMS)),
                                 "rating": data.draw(st.floats(0.5, 5.0)), "timestamp": start + i}
                                for i in range(n)]}
    elif label == "PUT /v1/users/{user_id}/profile":
        case.path_parameters = {"user_id": str(data.draw(users))}
    elif label == "GET /v1/users/{user_id}/history":
        case.path_parameters = {"user_id": data.draw(st.sampled_from(SEEDED_USERS))}
        cursor = data.draw(st.none() | st.sampled_from(cursors))
        case.query = {"limit": data.draw(st.integers(1, 100))} | ({} if cursor is None else {"cursor": cursor})


def operation_of(gateway: Gateway, label: str) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", gateway.app)
    published = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in schema.get_all_operations())}
    assert published == set(FUZZED), "a new operation must be fuzzed too"
    method, path = label.split(" ", 1)
    return schema[path][method]


def report(label: str, mode: str, statuses: Counter[int], record_property: Any) -> int:
    total = sum(statuses.values())
    record_property(f"fuzz_cases_{mode}", total)
    print(f"{mode} {label}: {total} cases, by status {dict(sorted(statuses.items()))}")
    return total


FUZZ_SETTINGS = hypothesis_settings(max_examples=2 * MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("label", FUZZED)
def test_schema_valid_requests_are_served_as_documented(gateway: Gateway, label: str, record_property: Any) -> None:
    operation = operation_of(gateway, label)
    clock = itertools.count(int(time.time()) - 50_000, 20)
    statuses: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(), data=st.data(), real=st.booleans())
    def run(case: Any, data: st.DataObject, real: bool) -> None:
        if real:
            realistic(label, data, case, clock, gateway.cursors)
        response = case.call_and_validate(checks=CHECKS, additional_checks=[refusals_are_documented])
        statuses[int(response.status_code)] += 1

    run()
    total = report(label, "positive", statuses, record_property)
    if label not in WITHOUT_INPUT:
        assert total >= MAX_EXAMPLES and statuses[200] >= MAX_EXAMPLES // 4, statuses  # success paths ran
    else:
        assert statuses[200] == total >= 1


@pytest.mark.parametrize("label", [label for label in FUZZED if label not in WITHOUT_INPUT])
def test_schema_invalid_requests_are_refused_in_the_error_schema(gateway: Gateway, label: str,
                                                                 record_property: Any) -> None:
    operation = operation_of(gateway, label)
    statuses: Counter[int] = Counter()

    @hypothesis_settings(FUZZ_SETTINGS, max_examples=MAX_EXAMPLES)
    @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
    def run(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS + [negative_data_rejection])
        statuses[int(response.status_code)] += 1

    run()
    total = report(label, "negative", statuses, record_property)
    assert total >= MAX_EXAMPLES // 2 and statuses[422] >= MAX_EXAMPLES // 2, statuses
