"""POST /v1/events end to end: appended to the real Redis in order, and read by the next score."""

from __future__ import annotations

import time
import uuid

import httpx
import numpy as np
from tests.e2e.e2e_support import Reference, World, assert_error, read_history


CANDIDATES = [4, 19, 33, 47, 66]
CRM_ATOL = 1e-5


def score(http: httpx.Client, user: str) -> dict:
    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is False, body
    return body


def crm_column(body: dict) -> np.ndarray:
    return np.asarray([s["crm_score"] for s in body["scores"]])


def test_new_events_are_stored_in_order_and_change_the_next_score(world: World, http: httpx.Client,
                                                                  reference: Reference) -> None:
    user = world.users[3]
    loaded_items, loaded_ratings, loaded_stamps, _ = world.histories[user]
    before = score(http, user)
    assert before["cold_start"] is False

    now = int(time.time())
    new = [(5, 5.0), (9, 1.0), (12, 5.0), (27, 4.5), (61, 0.5)]  # known items, increasing timestamps
    events = [{"item_id": item, "rating": rating, "timestamp": now - 100 + 10 * k}
              for k, (item, rating) in enumerate(new)]
    response = http.post("/v1/events", json={"user_id": user, "events": events})
    assert response.status_code == 200, response.text
    assert response.json() == {"appended": len(new), "history_length": len(loaded_items) + len(new)}

    stored = read_history(world, user)
    assert stored.exists
    np.testing.assert_array_equal(stored.items, np.r_[loaded_items, [i for i, _ in new]])
    np.testing.assert_array_equal(stored.ratings, np.r_[loaded_ratings, [r for _, r in new]].astype(np.float32))
    np.testing.assert_array_equal(stored.timestamps, np.r_[loaded_stamps, [e["timestamp"] for e in events]])

    after = score(http, user)
    assert after["cold_start"] is False
    crm_before, crm_after = crm_column(before), crm_column(after)
    assert np.abs(crm_after - crm_before).max() > 1e-4, (crm_before, crm_after)
    np.testing.assert_allclose(crm_after, reference.crm(user, CANDIDATES, extra=new).scores, atol=CRM_ATOL)


def test_out_of_order_events_are_refused_and_nothing_is_written(world: World, http: httpx.Client) -> None:
    user = world.users[5]
    now = int(time.time())
    ok = http.post("/v1/events", json={"user_id": user, "events": [{"item_id": 7, "rating": 4.0, "timestamp": now}]})
    assert ok.status_code == 200, ok.text
    length = len(read_history(world, user).items)

    late = http.post("/v1/events", json={"user_id": user, "events": [
        {"item_id": 8, "rating": 3.0, "timestamp": now - 3600}]})
    assert_error(late, 409, "out_of_order")
    stored = read_history(world, user)
    assert len(stored.items) == length and stored.items[-1] == 7 and stored.timestamps[-1] == now


def test_first_events_of_a_new_user_end_the_cold_start(world: World, http: httpx.Client,
                                                       reference: Reference) -> None:
    user = f"e2e-new-{uuid.uuid4().hex[:8]}"
    assert score(http, user)["cold_start"] is True
    now = int(time.time())
    new = [(2, 4.0), (30, 5.0), (44, 2.0)]
    response = http.post("/v1/events", json={"user_id": user, "events": [
        {"item_id": item, "rating": rating, "timestamp": now + k} for k, (item, rating) in enumerate(new)]})
    assert response.status_code == 200, response.text
    assert response.json() == {"appended": 3, "history_length": 3}

    body = score(http, user)
    assert body["cold_start"] is False
    np.testing.assert_allclose(crm_column(body), reference.crm(user, CANDIDATES, extra=new).scores, atol=CRM_ATOL)


def test_a_profile_alone_is_a_known_user_without_history(world: World, http: httpx.Client,
                                                         reference: Reference) -> None:
    user = f"e2e-profile-{uuid.uuid4().hex[:8]}"
    profile = {"gender": "female", "age": "25-34", "occupation": "artist"}
    response = http.put(f"/v1/users/{user}/profile", json={"profile": profile})
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": user, "fields": 3}
    stored = read_history(world, user)
    assert stored.exists and stored.profile == profile and len(stored.items) == 0

    body = score(http, user)
    assert body["cold_start"] is False
    expected = reference.crm_of(reference.view_of(np.zeros(0), np.zeros(0), profile), CANDIDATES).scores
    np.testing.assert_allclose(crm_column(body), expected, atol=CRM_ATOL)
    # The profile reaches the CRM: an anonymous user with no profile scores differently.
    assert np.abs(crm_column(body) - reference.crm("e2e-nobody", CANDIDATES).scores).max() > 1e-4
