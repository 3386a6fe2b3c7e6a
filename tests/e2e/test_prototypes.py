"""Serving by prototype over real HTTP: the world's LoRA exported with prototypes, each user
scored with the adapter of the prototype nearest to the user's gate outputs (named in the
response), exact adapters where the setting says so; pushes with prototype parts that do not fit
are refused and leave the served version as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from service.api.admin.auth import new_token
from service.bundle import prototypes as parts
from service.scoring.stages import user_adapter
from tests.e2e.e2e_support import LiveServer, Reference, World, assert_error, engine_dtype, llm_atol, tar_of

CANDIDATES = [3, 17, 42, 58, 71, 80]
VERSION = "proto-v1"
COUNT = 4


@pytest.fixture(scope="module")
def store(world: World, tmp_path_factory) -> Path:
    """A store holding the world's LoRA exported with prototypes."""
    from training.export.crm_bundle import export_crm_bundle
    from training.export.prototypes import PrototypeOptions
    from training.llm.fusion_fit import FusionOptions

    store = tmp_path_factory.mktemp("prototypes") / "model_store"
    export_crm_bundle(world.data_dir, world.crm_dir, store, VERSION, llm_dir=world.root / "lora",
                      base_model=world.base_dir, llm_report=world.root / "report",
                      fusion=FusionOptions(samples=50, serve="fused"), prototypes=PrototypeOptions(COUNT, seed=0))
    return store


@pytest.fixture(scope="module")
def token() -> tuple[str, str]:
    return new_token()


@pytest.fixture(scope="module")
def live(world: World, store: Path, token) -> Iterator[LiveServer]:
    server = LiveServer.start(world.settings(model_store=store, active_version=None, admin_enabled=True,
                                             admin_token_sha256=[token[1]], adapter_mode="prototypes"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer, token) -> Iterator[httpx.Client]:
    with live.client(token=token[0]) as c:
        yield c


@pytest.fixture(scope="module")
def reference(world: World, store: Path) -> Reference:
    return Reference(world, store / VERSION)


def score(client: httpx.Client, user: str) -> dict:
    r = client.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert not body["degraded"], body
    return body


def prototype_scores(reference: Reference, user: str, index: int) -> np.ndarray:
    """P(Yes) of the user's prompts with prototype ``index``'s adapter as a plain (shared) LoRA,
    computed without the serving engine."""
    from service.llm.personalized_lora import PersonalizedLoRA
    from training.llm.scoring import score_sequences
    from transformers import AutoModelForCausalLM

    weights = reference.model.prototypes.weights[index]
    shared = reference.model.lora_config.model_copy(update={"n_meta": 1, "gated": False})
    llm = AutoModelForCausalLM.from_pretrained(reference.world.base_dir, dtype=torch.float32,
                                               local_files_only=True).eval()
    lora = PersonalizedLoRA(llm, shared)
    lora.load_trainable_state_dict({f"{m}.{key}": value[None] for m, (a, b) in weights.items()
                                    for key, value in (("lora_A", a), ("lora_B", b))})
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    return score_sequences(llm, [prefix + s for s in suffixes], reference.builder.yes_id, reference.builder.no_id,
                           reference.pad_id, rows_context=lambda rows: lora.user(None)).numpy()


def test_each_user_is_served_the_nearest_prototype(client, live, world: World, reference: Reference) -> None:
    model = reference.model
    served = {}
    for user in world.users[:8]:
        body = score(client, user)
        expected = user_adapter(model, user, reference.crm(user, CANDIDATES).user_rep, None).prototype
        assert body["adapter"] == expected and expected in {f"p{i}" for i in range(COUNT)}, body
        served[user] = body
    user = world.users[0]
    index = int(served[user]["adapter"][1:])
    np.testing.assert_allclose([s["llm_score"] for s in served[user]["scores"]],
                               prototype_scores(reference, user, index), atol=llm_atol(engine_dtype(live)))


def test_exact_mode_serves_the_users_own_adapter(world: World, store: Path, reference: Reference) -> None:
    server = LiveServer.start(world.settings(model_store=store, active_version=VERSION, adapter_mode="exact"))
    try:
        with server.client() as exact:
            user = world.users[0]
            body = score(exact, user)
            assert "adapter" not in body
            np.testing.assert_allclose([s["llm_score"] for s in body["scores"]], reference.llm_scores(user, CANDIDATES),
                                       atol=llm_atol(engine_dtype(server)))
    finally:
        server.stop()


def pushed_bundle(store: Path, version: str, change) -> dict[str, bytes]:
    """The prototype bundle's files under ``version``, after ``change(files)``, honestly hashed."""
    import hashlib

    root = store / VERSION
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    change(files, manifest)
    manifest["version"] = version
    manifest["files"] = [{"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                         for rel, data in sorted(files.items())]
    return files | {"manifest.json": json.dumps(manifest).encode()}


class TestRefusals:
    """Prototype parts that do not fit are refused; the served version and answers stay as they were."""

    @pytest.fixture(autouse=True)
    def unchanged(self, client: httpx.Client, world: World) -> Iterator[None]:
        def answer() -> dict:
            return {k: v for k, v in score(client, world.users[1]).items() if k != "timings"}

        before = answer()
        yield
        assert client.get("/admin/v1/models").json()["active"] == VERSION
        assert answer() == before

    def push(self, client: httpx.Client, store: Path, version: str, change) -> httpx.Response:
        return client.put(f"/admin/v1/models/{version}", content=tar_of(pushed_bundle(store, version, change)),
                          params={"activate": "true"}, headers={"Content-Type": "application/x-tar"})

    def test_count_not_matching_the_adapters(self, client, store: Path) -> None:
        def more(files, manifest):
            manifest["components"][parts.COMPONENT]["config"]["count"] = COUNT + 1

        r = self.push(client, store, "bad-count", more)
        assert_error(r, 422, "model_refused")
        assert f"{COUNT + 1} prototypes lacks" in r.json()["error"]["message"]

    def test_adapter_of_the_wrong_shape(self, client, store: Path) -> None:
        def widen(files, manifest):
            weights = load_file(store / VERSION / parts.weights_path(1))
            key = next(k for k in sorted(weights) if k.endswith("lora_A.weight"))
            weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
            files[parts.weights_path(1)] = save(weights)

        r = self.push(client, store, "bad-shape", widen)
        assert_error(r, 422, "model_refused")
        assert "has shape" in r.json()["error"]["message"]

    def test_adapter_that_is_not_the_mixture_at_its_centroid(self, client, store: Path) -> None:
        def swap(files, manifest):
            files[parts.weights_path(0)], files[parts.weights_path(1)] = \
                files[parts.weights_path(1)], files[parts.weights_path(0)]

        r = self.push(client, store, "bad-mixture", swap)
        assert_error(r, 422, "model_refused")
        assert "not the LoRA's mixture at its centroid" in r.json()["error"]["message"]


def test_a_new_lora_on_a_prototype_version_serves_exact_adapters(client, store: Path, world: World) -> None:
    weights = load_file(store / VERSION / "lora" / "weights.safetensors")
    scaled = save({k: (v * 1.5 if k.endswith(".lora_B") else v).contiguous() for k, v in weights.items()})
    r = client.put("/admin/v1/models/derived/parts", content=tar_of({"lora/weights.safetensors": scaled}),
                   headers={"Content-Type": "application/x-tar"})
    assert r.status_code == 201, r.text
    manifest = json.loads((store / "derived" / "manifest.json").read_text())
    assert parts.COMPONENT not in manifest["components"]
    assert not any(f["path"].startswith("prototypes/") for f in manifest["files"])
    shutil.rmtree(store / "derived", ignore_errors=True)
