"""The model lifecycle against a running service: push, validate, activate, roll back, delete.

A second gateway (admin API on, its own copy of the model store) serves real HTTP over the e2e
world. Every refused push must leave the served version and its scores untouched; activation
under concurrent traffic must drop nothing and never mix versions in one answer; rollback must
restore the previous scores exactly.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tests.e2e.e2e_support import LiveServer, World, assert_error, metric_value, tar_of
from safetensors.torch import load_file, save_file

from service.api.admin.auth import new_token

CANDIDATES = [3, 17, 42, 58, 71, 80]
UPLOAD_CAP = 8 << 20


def bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


def perturbed_lora(bundle_dir: Path, scale: float) -> bytes:
    """The bundle's meta-LoRAs with every B bank scaled: a different, valid LoRA set."""
    weights = load_file(bundle_dir / "lora" / "weights.safetensors")
    out = {k: (v * scale if k.endswith(".lora_B") else v).contiguous() for k, v in weights.items()}
    path = bundle_dir.parent / f".lora-{scale}.safetensors"
    save_file(out, path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture(scope="module")
def token() -> tuple[str, str]:
    return new_token()


@pytest.fixture(scope="module")
def admin(world: World, tmp_path_factory, token) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("admin") / "model_store"
    shutil.copytree(world.bundle_dir, store / world.version)
    # One request per forward (no packing): every answer is then bit-exact per version, which is how
    # these tests tell the versions' answers apart (a packed bfloat16 forward rounds differently).
    server = LiveServer.start(world.settings(model_store=store, active_version=None, admin_enabled=True,
                                             admin_token_sha256=[token[1]], admin_max_upload_bytes=UPLOAD_CAP,
                                             engine_pack_tokens=0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(admin: LiveServer, token) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin.url, timeout=120, headers={"Authorization": f"Bearer {token[0]}"}) as c:
        yield c


def scores(client: httpx.Client, user: str) -> tuple[str, list[float]]:
    r = client.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert not body["degraded"], body
    return body["model_version"], [s["score"] for s in body["scores"]]


def active(client: httpx.Client) -> str:
    r = client.get("/admin/v1/models")
    assert r.status_code == 200, r.text
    return r.json()["active"]


def put(client: httpx.Client, path: str, body: bytes, **params) -> httpx.Response:
    return client.put(path, content=body, params=params, headers={"Content-Type": "application/x-tar"})


class TestRefusals:
    """Each bad push is refused with a clear error; the served version and scores stay as they were."""

    @pytest.fixture(autouse=True)
    def unchanged(self, client: httpx.Client, world: World) -> Iterator[None]:
        user = world.users[0]
        before = scores(client, user)
        yield
        assert active(client) == world.version
        assert scores(client, user) == before

    def test_no_token(self, admin: LiveServer):
        with admin.client() as anonymous:
            r = anonymous.get("/admin/v1/models")
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"

    def test_wrong_token(self, admin: LiveServer, world: World):
        with httpx.Client(base_url=admin.url, headers={"Authorization": "Bearer not-the-token"}) as wrong:
            r = wrong.put("/admin/v1/models/v9", content=tar_of(bundle_files(world.bundle_dir)))
            assert_error(r, 401, "unauthorized")
            assert_error(wrong.post(f"/admin/v1/models/{world.version}/activate"), 401, "unauthorized")

    def test_pickle_file(self, client, world: World):
        files = bundle_files(world.bundle_dir) | {"crm/extra.pkl": b"\x80\x04K\x01."}
        r = put(client, "/admin/v1/models/bad-pickle", tar_of(files))
        assert_error(r, 422, "model_refused")
        assert "pickle" in r.json()["error"]["message"]

    def test_pickle_renamed_to_npy(self, client, world: World):
        files = bundle_files(world.bundle_dir)
        r = put(client, "/admin/v1/models/bad-npy", tar_of(files | {"items/embeddings.npy": b"\x80\x04K\x01."}))
        assert_error(r, 422, "model_refused")

    @staticmethod
    def push_changed(client, world: World, version: str, rel: str, change) -> httpx.Response:
        """Push ``rel`` (a safetensors file of the bundle) as a part, after ``change(weights)``."""
        weights = load_file(world.bundle_dir / rel)
        change(weights)
        path = world.root / f"{version}.safetensors"
        save_file(weights, path)
        return put(client, f"/admin/v1/models/{version}/parts", tar_of({rel: path.read_bytes()}))

    def test_wrong_lora_shape(self, client, world: World):
        def widen(w):
            key = next(k for k in sorted(w) if k.endswith(".lora_A"))
            w[key] = torch.zeros(w[key].shape[0], w[key].shape[1] + 1, w[key].shape[2])

        r = self.push_changed(client, world, "bad-shape", "lora/weights.safetensors", widen)
        assert_error(r, 422, "model_refused")
        assert "shape" in r.json()["error"]["message"]

    def test_wrong_crm_shape(self, client, world: World):
        def grow(w):
            key = next(k for k in sorted(w) if w[k].dim() == 2)
            w[key] = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])

        r = self.push_changed(client, world, "bad-crm", "crm/weights.safetensors", grow)
        assert_error(r, 422, "model_refused")
        assert "size mismatch" in r.json()["error"]["message"]

    def test_integer_weights(self, client, world: World):
        def to_int(w):
            key = next(k for k in sorted(w) if k.endswith(".lora_B"))
            w[key] = w[key].round().to(torch.int64)

        r = self.push_changed(client, world, "int-lora", "lora/weights.safetensors", to_int)
        assert_error(r, 422, "model_refused")
        assert "must be floating point" in r.json()["error"]["message"]

    def test_nan_scores_fail_the_smoke_test(self, client, world: World):
        def poison(w):
            w["wide.bias"] = torch.full_like(w["wide.bias"], float("nan"))  # added to every logit

        error = assert_error(self.push_changed(client, world, "nan-crm", "crm/weights.safetensors", poison),
                             422, "model_refused")
        assert error["details"][0]["type"] == "smoke_test", error

    def test_lora_config_not_matching_its_weights(self, client, world: World):
        config = json.loads((world.bundle_dir / "lora" / "config.json").read_text())
        r = put(client, "/admin/v1/models/bad-rank/parts",
                tar_of({"lora/config.json": json.dumps(config | {"r": 4096}).encode()}))
        assert_error(r, 422, "model_refused")

    @pytest.mark.parametrize("member", ["../x/manifest.json", "/etc/passwd.json", "lora/../../x.json"])
    def test_escaping_names(self, client, member: str):
        assert_error(put(client, "/admin/v1/models/escape", tar_of({member: b"{}"})), 422, "model_refused")

    def test_bad_version_name(self, client, world: World):
        r = put(client, "/admin/v1/models/a..b", tar_of(bundle_files(world.bundle_dir)))
        assert_error(r, 422, "model_refused")

    def test_link_member(self, client):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        r = put(client, "/admin/v1/models/linked", buf.getvalue())
        assert_error(r, 422, "model_refused")
        assert "link" in r.json()["error"]["message"]

    def test_oversized_body(self, client):
        assert_error(put(client, "/admin/v1/models/huge", b"\0" * (UPLOAD_CAP + 1)), 413, "content_too_large")

    def test_oversized_stream_without_length(self, client):
        def chunks():
            for _ in range(UPLOAD_CAP // (1 << 20) + 2):
                yield b"\0" * (1 << 20)

        r = client.put("/admin/v1/models/huge-stream", content=chunks())
        assert_error(r, 413, "content_too_large")

    def test_truncated_archive(self, client, world: World):
        body = tar_of(bundle_files(world.bundle_dir))
        r = put(client, "/admin/v1/models/truncated", body[: len(body) // 2])
        assert_error(r, 422, "model_refused")
        assert "truncated" in r.json()["error"]["message"]

    def test_manifest_with_wrong_hash(self, client, world: World):
        files = bundle_files(world.bundle_dir)
        manifest = json.loads(files["manifest.json"])
        manifest["version"] = "bad-hash"
        manifest["files"][0]["sha256"] = "0" * 64
        r = put(client, "/admin/v1/models/bad-hash", tar_of(files | {"manifest.json": json.dumps(manifest).encode()}))
        assert_error(r, 422, "model_refused")
        assert "sha256" in r.json()["error"]["message"]

    def test_manifest_version_must_match_the_name(self, client, world: World):
        r = put(client, "/admin/v1/models/other-name", tar_of(bundle_files(world.bundle_dir)))
        assert_error(r, 422, "model_refused")

    def test_existing_version_is_immutable(self, client, world: World):
        r = put(client, f"/admin/v1/models/{world.version}", tar_of(bundle_files(world.bundle_dir)))
        assert_error(r, 409, "version_exists")

    def test_unknown_version(self, client):
        assert_error(client.post("/admin/v1/models/nope/activate"), 404, "unknown_version")

    def test_refusals_are_counted(self, client):
        text = client.get("/metrics").text
        assert metric_value(text, "reclora_model_refusals_total", {"reason": "unauthorized"}) >= 1
        assert metric_value(text, "reclora_model_refusals_total", {"reason": "archive"}) >= 1


class TestLifecycle:
    def test_push_activate_under_traffic_then_rollback(self, client, world: World):
        users = world.users[:4]
        v1 = world.version
        before = {u: scores(client, u) for u in users}
        assert {v for v, _ in before.values()} == {v1}

        # A new LoRA set on top of the active version, pushed gzip-compressed, not yet active.
        r = put(client, "/admin/v1/models/v2-lora/parts",
                tar_of({"lora/weights.safetensors": perturbed_lora(world.bundle_dir, -1.0)}, gz=True))
        assert r.status_code == 201, r.text
        assert r.json()["activated"] is False and any("smoke test" in c for c in r.json()["checks"])
        listed = client.get("/admin/v1/models").json()
        assert {v["version"] for v in listed["versions"]} == {v1, "v2-lora"}
        assert next(v for v in listed["versions"] if v["version"] == "v2-lora")["parents"] == [v1]
        assert active(client) == v1 and scores(client, users[0]) == before[users[0]]

        # Activation while four threads keep scoring: nothing dropped, nothing mixed.
        seen: list[tuple[str, str, list[float]]] = []
        failures: list[str] = []
        stop = threading.Event()

        def traffic(user: str) -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
                while not stop.is_set():
                    r = own.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
                    if r.status_code != 200 or r.json()["degraded"]:
                        failures.append(r.text)
                        continue
                    body = r.json()
                    seen.append((user, body["model_version"], [s["score"] for s in body["scores"]]))

        threads = [threading.Thread(target=traffic, args=(u,)) for u in users]
        for t in threads:
            t.start()
        try:
            give_up = time.monotonic() + 120
            while len(seen) < len(users):  # traffic is flowing on v1 before the switch
                assert not failures and time.monotonic() < give_up, failures[:3]
                threading.Event().wait(0.05)
            r = client.post("/admin/v1/models/v2-lora/activate")
            assert r.status_code == 200, r.text
            assert r.json()["previous"] == v1
            assert r.json()["checks"] == ["validated earlier in this process; manifest unchanged"]  # a swap
            n_at_switch = len(seen)
            while len(seen) < n_at_switch + 2 * len(users):
                assert not failures and time.monotonic() < give_up + 120, failures[:3]
                threading.Event().wait(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not failures, failures[:3]
        after = {u: scores(client, u) for u in users}
        assert {v for v, _ in after.values()} == {"v2-lora"}
        assert any(after[u][1] != before[u][1] for u in users), "the new LoRA must change the served scores"
        expected = {(u, v1): before[u][1] for u in users} | {(u, "v2-lora"): after[u][1] for u in users}
        for user, version, got in seen:  # every answer is wholly one version's
            assert got == expected[(user, version)], (user, version)
        assert {v for _, v, _ in seen} == {v1, "v2-lora"}

        # Rollback restores the previous scores exactly.
        r = client.post("/admin/v1/rollback")
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["previous"]) == (v1, "v2-lora")
        assert r.json()["checks"] == ["validated earlier in this process; manifest unchanged"]  # instant
        assert {u: scores(client, u) for u in users} == before

        text = client.get("/metrics").text
        assert metric_value(text, "reclora_model_activations_total", {"kind": "activate"}) >= 1
        assert metric_value(text, "reclora_model_activations_total", {"kind": "rollback"}) >= 1
        assert metric_value(text, "reclora_model_info", {"version": v1}) == 1

        # The active version cannot be deleted; an inactive one can.
        assert_error(client.delete(f"/admin/v1/models/{v1}"), 409, "conflict")
        assert client.delete("/admin/v1/models/v2-lora").status_code == 204
        assert [v["version"] for v in client.get("/admin/v1/models").json()["versions"]] == [v1]

    def test_whole_bundle_push_and_validate(self, client, world: World):
        files = bundle_files(world.bundle_dir)
        manifest = json.loads(files["manifest.json"])
        manifest["version"] = "v3-copy"
        r = put(client, "/admin/v1/models/v3-copy", tar_of(files | {"manifest.json": json.dumps(manifest).encode()}))
        assert r.status_code == 201, r.text
        r = client.post("/admin/v1/models/v3-copy/validate")
        assert r.status_code == 200 and r.json()["activated"] is False, r.text
        assert active(client) == world.version
        assert client.delete("/admin/v1/models/v3-copy").status_code == 204


class TestCli:
    """`reclora push / models / activate / rollback / delete-model` against the running service."""

    def run(self, admin: LiveServer, token, *args: str):
        from typer.testing import CliRunner

        from training.cli import app

        result = CliRunner().invoke(app, [*args, "--url", admin.url],
                                    env={"RECLORA_ADMIN_TOKEN": token[0], "COLUMNS": "200"})
        return result

    def test_engineer_session(self, admin: LiveServer, token, client, world: World, tmp_path: Path):
        lora = tmp_path / "lora"
        lora.mkdir()
        (lora / "weights.safetensors").write_bytes(perturbed_lora(world.bundle_dir, 0.5))
        shutil.copy(world.bundle_dir / "lora" / "config.json", lora / "config.json")
        before = scores(client, world.users[0])

        pushed = self.run(admin, token, "push", "cli-v2", "--lora", str(lora), "--activate")
        assert pushed.exit_code == 0, pushed.output
        assert "cli-v2: validated" in pushed.output and f"active (was {world.version})" in pushed.output
        assert scores(client, world.users[0])[0] == "cli-v2"

        listed = self.run(admin, token, "models")
        assert listed.exit_code == 0, listed.output
        rows = {line.split()[1]: line[0] for line in listed.output.splitlines()[1:] if line[:1] in "*< " and
                len(line.split()) > 1 and not line.startswith("(")}
        assert rows["cli-v2"] == "*" and rows[world.version] == "<", listed.output

        back = self.run(admin, token, "rollback")
        assert back.exit_code == 0, back.output
        assert scores(client, world.users[0]) == before

        assert self.run(admin, token, "activate", "cli-v2").exit_code == 0
        assert self.run(admin, token, "activate", world.version).exit_code == 0
        deleted = self.run(admin, token, "delete-model", "cli-v2")
        assert deleted.exit_code == 0, deleted.output

        refused = self.run(admin, token, "push", "cli-bad", "--lora", str(tmp_path / "missing"))
        assert refused.exit_code == 2 and "missing" in refused.output

    def test_wrong_token_is_a_clear_error(self, admin: LiveServer, world: World):
        result = self.run(admin, ("wrong", ""), "models")
        assert result.exit_code == 2 and "401 unauthorized" in result.output


def test_gateways_sharing_a_store_follow_an_activation(admin: LiveServer, client, world: World):
    """A second gateway on the same store (no admin API) serves what the first one activated."""
    follower = LiveServer.start(world.settings(model_store=Path(admin.app.state.settings.model.model_store),
                                               active_version=None, model_poll_s=0.2, engine_pack_tokens=0))
    try:
        with follower.client() as other:
            assert scores(other, world.users[0])[0] == world.version
            r = put(client, "/admin/v1/models/shared-v2/parts",
                    tar_of({"lora/weights.safetensors": perturbed_lora(world.bundle_dir, 2.0)}), activate="true")
            assert r.status_code == 201, r.text
            expected = scores(client, world.users[0])
            assert expected[0] == "shared-v2"
            deadline = time.monotonic() + 60
            while scores(other, world.users[0])[0] != "shared-v2":
                assert time.monotonic() < deadline, "the second gateway did not follow the activation"
                time.sleep(0.2)
            # Two gateways in one process share torch's thread pool, whose split of a float32 matmul
            # may round the last bit differently; the versions' answers differ by far more.
            version, followed = scores(other, world.users[0])
            assert version == expected[0]
            np.testing.assert_allclose(followed, expected[1], rtol=0, atol=1e-6)
            text = other.get("/metrics").text
            assert metric_value(text, "reclora_model_activations_total", {"kind": "follow"}) == 1
    finally:
        follower.stop()
        assert client.post("/admin/v1/rollback").status_code == 200
        assert client.delete("/admin/v1/models/shared-v2").status_code == 204
