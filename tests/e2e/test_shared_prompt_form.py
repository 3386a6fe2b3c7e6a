"""The shared-history prompt form end to end on the tiny world: ``train-llm --prompt-form shared``
through the command line, the export carrying the LoRA's form into the bundle, the gateway
serving it (the history in a prefix run once a request, short suffixes, scores equal to a plain
float32 forward of each whole prompt), and bundles refusing a LoRA trained on the other form."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.bundle import MANIFEST_NAME
from service.model import load_model
from service.registry.errors import RefusalReason, ValidationFailed
from service.registry.validation import load_candidate
from tests.e2e.e2e_support import LiveServer, Reference, World, export_shared_form, serving_float32

SHARED_VERSION = "e2e-shared-v1"
CANDIDATES = list(range(3, 80, 4))  # 20 raw item ids
ATOL = 1e-4  # float32 engine against the float32 whole-prompt forward


@pytest.fixture(scope="module")
def shared_store(world: World, tmp_path_factory) -> Path:
    """A store with the world's data, CRM and base model and a LoRA trained on the shared form."""
    return export_shared_form(world, tmp_path_factory.mktemp("shared-form"), SHARED_VERSION)


@pytest.fixture(scope="module")
def reference(world: World, shared_store: Path) -> Reference:
    return Reference(world, shared_store / SHARED_VERSION)


@pytest.fixture(scope="module")
def shared_server(world: World, shared_store: Path) -> Iterator[LiveServer]:
    with serving_float32(world, shared_store, SHARED_VERSION) as server:
        yield server


def with_trained_form(bundle: Path, out: Path, form: str) -> Path:
    """A copy of ``bundle`` whose manifest says its LoRA was trained on ``form``."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["components"]["llm"]["config"]["prompt_form"] = form
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def test_the_trained_form_is_recorded_in_the_run_and_the_bundle(shared_store: Path) -> None:
    bundle = shared_store / SHARED_VERSION
    train = json.loads((bundle.parent.parent / "lora" / "train.json").read_text())
    assert train["config"]["prompt_form"] == "shared" and train["prompt"]["form"] == "shared"
    assert json.loads((bundle / "prompt" / "config.json").read_text())["version"] == "rella-chat-shared-v1"
    llm = json.loads((bundle / MANIFEST_NAME).read_text())["components"]["llm"]["config"]
    assert (llm["prompt_form"], llm["prompt_version"]) == ("shared", "rella-chat-shared-v1")
    model = load_model(bundle)
    assert model.prompt.form == model.lora_prompt_form == "shared"


def test_a_bundle_refuses_a_lora_trained_on_the_other_form(world: World, shared_store: Path, tmp_path: Path) -> None:
    for bundle, other in ((world.bundle_dir, "shared"), (shared_store / SHARED_VERSION, "per_target")):
        with pytest.raises(ValidationFailed) as refused:
            load_candidate(with_trained_form(bundle, tmp_path / bundle.name, other))
        assert refused.value.reason is RefusalReason.PROMPT_MISMATCH
        assert f"trained on the {other!r} prompt form" in str(refused.value)


def test_the_gateway_runs_the_shared_prefix_once_and_scores_as_whole_prompts(
        world: World, reference: Reference, shared_server: LiveServer) -> None:
    user = world.users[0]
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    assert len(suffixes) == len(CANDIDATES) and all(len(s) < len(prefix) for s in suffixes)
    assert "rated them:\n1." in reference.builder.tokenizer.decode(prefix)  # the history closes the prefix
    rows: list[list[int]] = []
    shared_server.app.state.scorer.engine.observe_rows = lambda batch: rows.extend(list(r.tokens) for r in batch)
    try:
        with shared_server.client() as http:
            response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    finally:
        shared_server.app.state.scorer.engine.observe_rows = None
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == SHARED_VERSION and body["degraded"] is False
    # the prefix, history included, ran once for the 20 candidates (with the start their suffixes share)
    assert sum(row[: len(prefix)] == prefix for row in rows) == 1
    assert sum(map(len, rows)) <= len(prefix) + sum(map(len, suffixes))  # nothing ran twice
    served = np.asarray([s["llm_score"] for s in body["scores"]], np.float64)
    np.testing.assert_allclose(served, reference.llm_scores(user, CANDIDATES), atol=ATOL, rtol=0)


def test_an_explanation_shows_the_one_history_every_candidate_reads(world: World, reference: Reference,
                                                                    shared_server: LiveServer) -> None:
    user = world.users[0]
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    with shared_server.client() as http:
        response = http.post("/v1/explain", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt_form"] == "shared" and body["prefix_tokens"] == len(prefix)
    candidates = body["candidates"]
    assert [c["prompt_tokens"] for c in candidates] == [len(prefix) + len(s) for s in suffixes]
    read = {tuple(b["position"] for b in c["history"]) for c in candidates}
    assert len(read) == 1 and len(next(iter(read))) > 0  # the set's one history, in every candidate's explanation
    np.testing.assert_allclose([c["llm_score"] for c in candidates], reference.llm_scores(user, CANDIDATES),
                               atol=ATOL, rtol=0)


def test_the_scoring_sequence_scores_in_the_bundles_form(world: World, reference: Reference) -> None:
    """Shadow scoring and the smoke test run ``score_sequence``: the same prompts and scores."""
    import torch
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import TorchEngine
    from service.scoring.sequence import score_sequence

    model, builder, user = reference.model, reference.builder, world.users[1]
    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32, local_files_only=True)
    engine = TorchEngine(llm, yes_id=builder.yes_id, no_id=builder.no_id,
                         target_modules=model.lora_config.target_modules)
    result = score_sequence(model, builder, engine, None, user, reference.view(user),
                            model.catalog.to_dense(CANDIDATES))
    assert (result.prompts.prefix, result.prompts.suffixes) == reference.sequences(user, CANDIDATES)
    np.testing.assert_allclose(result.scored.llm, reference.llm_scores(user, CANDIDATES), atol=ATOL, rtol=0)


def test_the_vllm_engine_sends_the_shared_prefix_as_the_query(world: World, reference: Reference,
                                                               tmp_path: Path) -> None:
    """The remote engine takes the same prefix and suffixes: the history once, as the query the
    server's prefix cache keys on, and each candidate's question as an item."""
    from service.scoring.stages import build_adapter, run_crm
    from tests.service.engine.vllm.test_vllm_engine_unit import build

    user = world.users[2]
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    model = reference.model
    crm = run_crm(model, reference.view(user), model.catalog.to_dense(CANDIDATES))
    engine, (server,) = build(tmp_path)
    engine.score(build_adapter(model, user, model.mixer.mixtures(crm.user_rep)), prefix, suffixes)
    (body,) = [body for path, body in server.calls if path == "/generative_scoring" and body]  # not the probe
    assert body["query"] == prefix and body["items"] == suffixes
