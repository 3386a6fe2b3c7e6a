"""Canary rollout and online evaluation against running gateways, over real HTTP and Redis.

The gateways serve CRM-only bundles of the e2e world (fast to load and score): ``crm-v1``, the
world's CRM; ``crm-v2``, the same CRM with its head's last layer halved (other scores, the same
catalog); ``crm-bad``, its logit negated (head's last layer, wide part, item biases), the
deliberately bad candidate. The users' histories are loaded under a key prefix of this module's
own, so the events these tests append and the labels they give touch nothing else.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from tests.e2e.e2e_support import REDIS_URL, LiveServer, World, assert_error, metric_value, wait_for
from tests.redis_support import scratch_prefix
from safetensors.torch import load_file, save_file

from service.api.admin.auth import new_token
from service.history import bulk_load
from service.model.holder import BUCKETS, user_bucket

CANDIDATES = [3, 17, 42, 58, 71, 80]
MIN_LABELS = 20
STREAM_CAP = 500
LABEL_WINDOW_S = 2


def crm_variant(world: World, out: Path, change) -> Path:
    """A copy of the world's CRM checkpoint with ``change(weights)`` applied."""
    shutil.copytree(world.crm_dir, out)
    weights = load_file(out / "weights.safetensors")
    change(weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
    return out


def halve(w) -> None:
    w["head.1.weight"] = w["head.1.weight"] * 0.5


def negate(w) -> None:
    """The CRM's logit is deep head + wide part + item bias: negating the last layer of each
    negates the logit exactly, so the bad candidate ranks every user's items upside down."""
    for key in ("head.1.weight", "head.1.bias", "wide.weight", "wide.bias", "item_bias.weight"):
        w[key] = -w[key]


@pytest.fixture(scope="module")
def bundles(world: World, tmp_path_factory) -> Path:
    """A store template with crm-v1, crm-v2 and crm-bad."""
    from training.export.crm_bundle import export_crm_bundle

    root = tmp_path_factory.mktemp("canary")
    store = root / "template"
    export_crm_bundle(world.data_dir, world.crm_dir, store, "crm-v1")
    export_crm_bundle(world.data_dir, crm_variant(world, root / "crm-v2", halve), store, "crm-v2")
    export_crm_bundle(world.data_dir, crm_variant(world, root / "crm-bad", negate), store, "crm-bad")
    return store


@pytest.fixture(scope="module")
def prefix(world: World) -> Iterator[str]:
    with scratch_prefix("canary") as p:
        records = [(user, *world.histories[user]) for user in world.histories]
        bulk_load(REDIS_URL, records, prefix=p, progress=False, total=len(records))
        yield p


@pytest.fixture(scope="module")
def token() -> tuple[str, str]:
    return new_token()


def gateway_settings(world: World, store: Path, prefix: str, token, **overrides):
    values = dict(model_store=store, active_version=None, redis_prefix=prefix, admin_enabled=True,
                  admin_token_sha256=[token[1]], model_poll_s=0.2, online_eval_interval_s=0.1,
                  canary_min_requests=40, canary_min_labels=MIN_LABELS, canary_max_auc_drop=0.1,
                  # the loaded 2-core box's latency spikes are not what these tests are about
                  canary_max_p99_excess_ms=60_000, served_log_max_len=STREAM_CAP,
                  online_label_window_s=LABEL_WINDOW_S)
    values.update(overrides)
    return world.settings(**values)


def fresh_store(bundles: Path, dest: Path) -> Path:
    shutil.copytree(bundles, dest)
    (dest / "ACTIVE").write_text("crm-v1\n")
    return dest


@pytest.fixture(scope="module")
def gateway(world: World, bundles: Path, prefix: str, token, tmp_path_factory) -> Iterator[LiveServer]:
    store = fresh_store(bundles, tmp_path_factory.mktemp("canary-gw") / "store")
    server = LiveServer.start(gateway_settings(world, store, prefix, token))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(gateway: LiveServer, token) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {token[0]}"}) as c:
        yield c


@pytest.fixture
def no_canary(admin: httpx.Client) -> Iterator[None]:
    """Each test starts on crm-v1 without a canary and leaves it so."""
    assert admin.get("/admin/v1/models").json()["active"] == "crm-v1"
    yield
    state = admin.get("/admin/v1/canary").json()["canary"]
    if state is not None and state["status"] == "running":
        assert admin.post("/admin/v1/canary/abort").status_code == 200
    if admin.get("/admin/v1/models").json()["active"] != "crm-v1":
        assert admin.post("/admin/v1/models/crm-v1/activate").status_code == 200


def score(client: httpx.Client, user: str, candidates=CANDIDATES) -> tuple[str, list[float]]:
    r = client.post("/v1/score", json={"user_id": user, "candidates": candidates})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], [s["score"] for s in body["scores"]]


def on_candidate(user: str, candidate: str, percent: float) -> bool:
    return user_bucket(user, candidate) < round(percent * BUCKETS / 100)


def start(admin: httpx.Client, version: str, percent: float, shadow: bool = False) -> dict:
    r = admin.post("/admin/v1/canary", json={"version": version, "percent": percent, "shadow": shadow})
    assert r.status_code == 200, r.text
    return r.json()["canary"]


def test_users_are_assigned_by_a_stable_hash_in_proportion(admin, world: World, no_canary):
    users = sorted(world.histories)
    baseline = {u: score(admin, u) for u in users[:40]}
    assert {v for v, _ in baseline.values()} == {"crm-v1"}
    state = start(admin, "crm-v2", 50)
    assert (state["candidate"], state["stable"], state["status"]) == ("crm-v2", "crm-v1", "running")
    first = {u: score(admin, u) for u in users}
    expected = {u: "crm-v2" if on_candidate(u, "crm-v2", 50) else "crm-v1" for u in users}
    assert {u: v for u, (v, _) in first.items()} == expected
    share = sum(v == "crm-v2" for v in expected.values()) / len(users)
    assert 0.35 < share < 0.65, share  # 120 users: 3 sigma of a fair split
    for u in users[:40]:  # a user stays on their side; the stable side keeps its scores, the other not
        assert score(admin, u) == first[u]
        assert (first[u] == baseline[u]) == (expected[u] == "crm-v1")
    # A larger share only adds users.
    start(admin, "crm-v2", 80)
    for u in users:
        version = score(admin, u)[0]
        assert version == ("crm-v2" if on_candidate(u, "crm-v2", 80) else "crm-v1")
        if expected[u] == "crm-v2":
            assert version == "crm-v2"
    listed = admin.get("/admin/v1/models").json()
    assert listed["canary"]["percent"] == 80
    assert {v["version"] for v in listed["versions"] if v["canary"]} == {"crm-v2"}


def test_bad_requests_say_what_is_wrong(admin, no_canary):
    error = assert_error(admin.post("/admin/v1/canary", json={"version": "crm-v2", "percent": 150}), 422)
    assert error["details"][0]["loc"].endswith("percent"), error
    assert_error(admin.post("/admin/v1/canary", json={"version": "crm-v2", "percent": 0}), 422)
    assert_error(admin.post("/admin/v1/canary", json={"version": "../x", "percent": 5}), 422)
    assert_error(admin.post("/admin/v1/canary", json={"version": "nope", "percent": 5}), 404, "unknown_version")
    assert_error(admin.post("/admin/v1/canary", json={"version": "crm-v1", "percent": 5}), 409)
    assert_error(admin.post("/admin/v1/canary/promote"), 409)
    assert_error(admin.post("/admin/v1/canary/abort"), 409)
    start(admin, "crm-v2", 10)
    assert_error(admin.post("/admin/v1/canary", json={"version": "crm-bad", "percent": 5}), 409)
    assert_error(admin.post("/admin/v1/models/crm-bad/activate"), 409)
    assert_error(admin.post("/admin/v1/rollback"), 409)
    assert_error(admin.delete("/admin/v1/models/crm-v2"), 409)
    with httpx.Client(base_url=str(admin.base_url)) as anonymous:
        assert_error(anonymous.post("/admin/v1/canary/abort"), 401, "unauthorized")


def traffic_during(admin: httpx.Client, users: list[str], action, min_after: int) -> list[tuple[str, str, list[float]]]:
    """(user, version, scores) of every answer while threads score ``users`` and ``action()``
    runs midway."""
    seen: list[tuple[str, str, list[float]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def loop(user: str) -> None:
        with httpx.Client(base_url=str(admin.base_url), timeout=60) as own:
            while not stop.is_set():
                r = own.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                body = r.json()
                seen.append((user, body["model_version"], [s["score"] for s in body["scores"]]))

    threads = [threading.Thread(target=loop, args=(u,)) for u in users]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) >= 2 * len(users) or bool(failures), 60, "traffic before the switch")
        action()
        n = len(seen)
        wait_for(lambda: len(seen) >= n + min_after or bool(failures), 60, "traffic after the switch")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    return seen


def test_promote_and_abort_under_traffic_never_mix_versions(admin, world: World, no_canary):
    users = world.users[:12]
    v1 = {u: score(admin, u)[1] for u in users}
    start(admin, "crm-v2", 50)
    on_v2 = [u for u in users if on_candidate(u, "crm-v2", 50)]
    assert 0 < len(on_v2) < len(users)
    v2 = {u: score(admin, u)[1] for u in on_v2}

    def abort() -> None:
        r = admin.post("/admin/v1/canary/abort", json={"reason": "testing an abort under traffic"})
        assert r.status_code == 200 and r.json()["canary"]["status"] == "aborted", r.text

    seen = traffic_during(admin, users[:4] + on_v2[:2], abort, 12)
    for user, version, got in seen:  # every answer is wholly the version it names
        assert got == (v2[user] if version == "crm-v2" else v1[user]), (user, version)
    assert {v for _, v, _ in seen} == {"crm-v1", "crm-v2"}
    assert {u: score(admin, u)[0] for u in users} == {u: "crm-v1" for u in users}

    start(admin, "crm-v2", 50)
    everyone_v2 = {}

    def promote() -> None:
        r = admin.post("/admin/v1/canary/promote")
        assert r.status_code == 200 and (r.json()["version"], r.json()["previous"]) == ("crm-v2", "crm-v1"), r.text

    seen = traffic_during(admin, users[:6], promote, 12)
    for user in users[:6]:
        everyone_v2[user] = score(admin, user)
        assert everyone_v2[user][0] == "crm-v2"
    for user, version, got in seen:
        expected = everyone_v2[user][1] if version == "crm-v2" else v1[user]
        assert got == expected, (user, version)
    state = admin.get("/admin/v1/canary").json()["canary"]
    assert state["status"] == "promoted" and admin.get("/admin/v1/models").json()["active"] == "crm-v2"
    text = admin.get("/metrics").text
    assert metric_value(text, "reclora_model_activations_total", {"kind": "promote"}) >= 1
    assert metric_value(text, "reclora_canary_aborts_total", {"rail": "operator"}) >= 1


def served_hash(prefix: str, user: str) -> str:
    return f"{prefix}{{u:{user}}}:served"


def test_the_served_score_stream_stays_within_its_cap(admin, world: World, prefix: str, no_canary):
    r = redis.Redis.from_url(REDIS_URL)
    try:
        key = f"{prefix}online:served"

        def written() -> float:
            return metric_value(admin.get("/metrics").text, "reclora_served_log_scores_total", {"outcome": "written"})

        before, n = written(), 2 * STREAM_CAP // len(CANDIDATES)
        with httpx.Client(base_url=str(admin.base_url), timeout=60) as client:
            for i in range(n):
                score(client, world.users[i % len(world.users)])
        wait_for(lambda: written() >= before + n * len(CANDIDATES), 30, "the log written")
        node = int(r.config_get("stream-node-max-entries")["stream-node-max-entries"])
        assert STREAM_CAP <= r.xlen(key) <= STREAM_CAP + node  # MAXLEN ~ trims whole nodes
        last = r.xrevrange(key, count=1)[0][1]
        assert {k.decode() for k in last} == {"r", "u", "i", "v", "s", "l", "c", "t", "sh"}
        assert last[b"v"] == b"crm-v1" and last[b"sh"] == b"0" and last[b"r"]
    finally:
        r.close()


def labels(prefix: str) -> list[dict[str, str]]:
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return [fields for _, fields in r.xrange(f"{prefix}online:labels")]
    finally:
        r.close()


def post_events(client: httpx.Client, user: str, events: list[tuple[int, float]]) -> None:
    now = int(time.time())
    r = client.post("/v1/events", json={"user_id": user, "events": [
        {"item_id": item, "rating": rating, "timestamp": now} for item, rating in events]})
    assert r.status_code == 200, r.text


def test_a_label_joins_only_the_same_user_and_item_within_the_window(admin, world: World, prefix: str, no_canary):
    r = redis.Redis.from_url(REDIS_URL)
    try:
        user, other = world.users[20], world.users[21]
        before = len(labels(prefix))
        version, scores = score(admin, user)
        wait_for(lambda: r.hexists(served_hash(prefix, user), str(CANDIDATES[2])), 10, "served score indexed")
        post_events(admin, other, [(CANDIDATES[2], 5.0)])  # another user: nothing to label
        post_events(admin, user, [(5, 5.0)])  # an item not scored for the user
        post_events(admin, user, [(CANDIDATES[2], 4.0), (CANDIDATES[4], 2.0)])
        wait_for(lambda: len(labels(prefix)) >= before + 2, 10, "labels written")
        time.sleep(0.3)  # nothing else arrives
        new = labels(prefix)[before:]
        assert sorted((int(e["i"]), e["u"], int(e["y"]), e["v"], float(e["s"])) for e in new) == [
            (CANDIDATES[2], user, 1, version, scores[2]), (CANDIDATES[4], user, 0, version, scores[4])]
        post_events(admin, user, [(CANDIDATES[2], 5.0)])  # the same served score is labelled once
        # Past the window, a served score labels nothing.
        score(admin, user)
        wait_for(lambda: r.hexists(served_hash(prefix, user), str(CANDIDATES[0])), 10, "served score indexed")
        time.sleep(LABEL_WINDOW_S + 0.5)
        post_events(admin, user, [(CANDIDATES[0], 5.0)])
        time.sleep(0.5)
        assert len(labels(prefix)) == before + 2
        text = admin.get("/metrics").text
        assert metric_value(text, "reclora_online_labels_total", {"outcome": "joined"}) >= 2
        assert metric_value(text, "reclora_online_labels_total", {"outcome": "unmatched"}) >= 3
    finally:
        r.close()


def test_a_bad_candidate_is_aborted_by_its_online_auc(admin, gateway: LiveServer, world: World, prefix: str,
                                                      no_canary, token):
    """Users act as the stable version predicts (the item it ranks first is rated 5, the last 1),
    so the stable version's online AUC is high and the negated candidate's low: the guard must
    abort it once both sides have their minimum of labels, and no answer after that is its."""
    users = [u for u in sorted(world.histories)]
    start(admin, "crm-bad", 50)
    answers: list[tuple[str, str]] = []
    aborted_at = None
    for i in range(400):
        user = users[i % len(users)]
        version, scores = score(admin, user)
        answers.append((user, version))
        order = np.argsort(scores)
        best, worst = (order[-1], order[0]) if version == "crm-v1" else (order[0], order[-1])
        post_events(admin, user, [(CANDIDATES[best], 5.0), (CANDIDATES[worst], 1.0)])
        state = admin.get("/admin/v1/canary").json()["canary"]
        if state["status"] != "running":
            aborted_at = len(answers)
            break
    assert aborted_at is not None, "the bad candidate was not aborted"
    assert (state["status"], state["ended_by"], state["rail"]) == ("aborted", "guard", "online_auc"), state
    assert "online AUC" in state["reason"]
    served_by_bad = sum(v == "crm-bad" for _, v in answers)
    assert MIN_LABELS // 2 <= served_by_bad <= gateway.app.state.settings.canary.canary_min_requests, served_by_bad
    # After the abort nobody gets the candidate's scores, its users included.
    bad_users = [u for u in users if on_candidate(u, "crm-bad", 50)][:10]
    assert {score(admin, u)[0] for u in bad_users} == {"crm-v1"}
    text = admin.get("/metrics").text
    assert metric_value(text, "reclora_canary_aborts_total", {"rail": "online_auc"}) == 1
    assert metric_value(text, "reclora_canary_percent") == 0
    assert metric_value(text, "reclora_online_auc", {"version": "crm-v1"}) > 0.8
    # `reclora models` shows why.
    from typer.testing import CliRunner

    from training.cli import app

    listed = CliRunner().invoke(app, ["models", "--url", gateway.url],
                                env={"RECLORA_ADMIN_TOKEN": token[0], "COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "canary crm-bad serving 50% of users beside crm-v1: aborted by the guard (online_auc)" in listed.output
    assert "online AUC" in listed.output


def test_online_report_cli_writes_a_table_and_a_png(gateway: LiveServer, admin, world: World, prefix: str, token,
                                                    tmp_path: Path, no_canary):
    from typer.testing import CliRunner

    from training.cli import app

    r = redis.Redis.from_url(REDIS_URL)
    try:
        before = len(labels(prefix))
        for user in world.users[40:44]:
            score(admin, user)
            wait_for(lambda: r.hexists(served_hash(prefix, user), str(CANDIDATES[0])), 10, "served score indexed")
            post_events(admin, user, [(CANDIDATES[0], 5.0), (CANDIDATES[1], 1.0)])
        wait_for(lambda: len(labels(prefix)) >= before + 8, 10, "labels written")
    finally:
        r.close()
    png = tmp_path / "online.png"
    result = CliRunner().invoke(app, ["online-report", "--url", gateway.url, "--bucket-s", "5", "--png", str(png)],
                                env={"RECLORA_ADMIN_TOKEN": token[0], "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "crm-v1" in result.output and "AUC" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token[0]}"}) as admin:
        report = admin.get("/admin/v1/online", params={"bucket_s": 5}).json()
        assert_error(admin.get("/admin/v1/online", params={"bucket_s": 0}), 422)
    versions = {m["version"]: m for m in report["versions"]}
    assert versions["crm-v1"]["labels"] == sum(p["labels"] for p in report["series"] if p["version"] == "crm-v1")


def test_restart_and_a_second_gateway_keep_the_canary(world: World, bundles: Path, prefix: str, token, tmp_path):
    """The canary state is the store's: a gateway restarted on it, and a follower sharing it
    without the admin API, route the same users to the candidate; an abort reaches the follower."""
    store = fresh_store(bundles, tmp_path / "store")
    users = sorted(world.histories)[:40]
    expected = {u: "crm-v2" if on_candidate(u, "crm-v2", 30) else "crm-v1" for u in users}
    first = LiveServer.start(gateway_settings(world, store, prefix, token))
    try:
        with httpx.Client(base_url=first.url, timeout=60, headers={"Authorization": f"Bearer {token[0]}"}) as a:
            start(a, "crm-v2", 30, shadow=False)
    finally:
        first.stop()
    assert json.loads((store / "CANARY").read_text())["status"] == "running"
    again = LiveServer.start(gateway_settings(world, store, prefix, token))
    follower = LiveServer.start(gateway_settings(world, store, prefix, token, admin_enabled=False,
                                                 admin_token_sha256=[]))
    try:
        with again.client() as a, follower.client() as f:
            assert {u: score(a, u)[0] for u in users} == expected
            assert {u: score(f, u)[0] for u in users} == expected
            r = a.post("/admin/v1/canary/abort", headers={"Authorization": f"Bearer {token[0]}"})
            assert r.status_code == 200, r.text
            on_v2 = [u for u in users if expected[u] == "crm-v2"]
            wait_for(lambda: all(score(f, u)[0] == "crm-v1" for u in on_v2), 30, "the follower follows the abort")
    finally:
        follower.stop()
        again.stop()


def test_a_shadow_candidate_scores_in_the_background_and_is_never_served(admin, world: World, prefix: str,
                                                                         no_canary):
    r = redis.Redis.from_url(REDIS_URL)
    try:
        start(admin, "crm-v2", 100, shadow=True)
        user = world.users[30]
        version, scores = score(admin, user)
        assert version == "crm-v1"  # served by the stable version
        key = served_hash(prefix, user)
        wait_for(lambda: r.hexists(key, f"{CANDIDATES[1]}|shadow"), 20, "the shadow score recorded")
        served = json.loads(r.hget(key, str(CANDIDATES[1])))
        shadow = json.loads(r.hget(key, f"{CANDIDATES[1]}|shadow"))
        assert (served[0], served[1]) == ("crm-v1", scores[1])
        assert shadow[0] == "crm-v2" and shadow[1] != scores[1] and shadow[3] == served[3]  # same request id
        before = len(labels(prefix))
        post_events(admin, user, [(CANDIDATES[1], 5.0)])  # one event labels both
        wait_for(lambda: len(labels(prefix)) >= before + 2, 10, "labels")
        new = labels(prefix)[before:]
        assert sorted((e["v"], e["sh"]) for e in new) == [("crm-v1", "0"), ("crm-v2", "1")]
        text = admin.get("/metrics").text
        assert metric_value(text, "reclora_canary_shadow") == 1
        assert metric_value(text, "reclora_shadow_requests_total", {"outcome": "queued"}) >= 1
    finally:
        r.close()


def test_the_cli_starts_promotes_and_aborts(gateway: LiveServer, admin, world: World, token, no_canary):
    from typer.testing import CliRunner

    from training.cli import app

    def run(*args: str):
        result = CliRunner().invoke(app, [*args, "--url", gateway.url],
                                    env={"RECLORA_ADMIN_TOKEN": token[0], "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    user = next(u for u in sorted(world.histories) if on_candidate(u, "crm-v2", 20))
    assert "canary crm-v2 serving 20% of users beside crm-v1: running" in run("canary", "crm-v2", "--percent", "20")
    assert score(admin, user)[0] == "crm-v2"
    listed = run("models")
    assert any(line.startswith("~ crm-v2") for line in listed.splitlines()), listed
    assert "aborted by an operator" in run("abort", "--reason", "checking the CLI")
    assert score(admin, user)[0] == "crm-v1"
    assert "shadowing 20%" in run("canary", "crm-v2", "--percent", "20", "--shadow")
    assert "crm-v2 active for everyone (was crm-v1)" in run("promote")
    assert score(admin, world.users[0])[0] == "crm-v2"
    refused = CliRunner().invoke(app, ["canary", "crm-v1", "--percent", "0", "--url", gateway.url],
                                 env={"RECLORA_ADMIN_TOKEN": token[0], "COLUMNS": "200"})
    assert refused.exit_code == 2 and "422" in refused.output and "percent" in refused.output
