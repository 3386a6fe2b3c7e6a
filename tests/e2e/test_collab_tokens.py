"""Collaborative tokens end to end on the tiny world: ``train-llm --collab-tokens`` through the
command line, the export carrying the projector into the bundle, the embedded engine scoring it
as a plain float32 forward of each whole prompt with the CRM's vectors in place, through the
gateway too, and the refusals of bundles and engines that cannot serve it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from service.bundle import MANIFEST_NAME
from service.engine.base import EngineCall
from service.engine.torch_engine import TorchEngine
from service.llm.collab_tokens import EMBED_ID_BASE
from service.registry.errors import RefusalReason, ValidationFailed
from service.registry.validation import BaseModelSpec, check_collab, collab_engine_refusal, load_candidate
from tests.e2e.e2e_support import LiveServer, Reference, World, export_shared_form, serving_float32

COLLAB_VERSION = "e2e-collab-v1"
CANDIDATES = list(range(3, 80, 4))  # 20 raw item ids
ATOL = 1e-4  # float32 engine against the float32 whole-prompt forward


def perturb_projector(lora_dir: Path) -> None:
    """A few steps leave the projector's output layers (zero at the start) tiny: perturb them so the
    CRM's vectors visibly move the LLM's answer, which the tests then check is really live."""
    weights = load_file(lora_dir / "collab.safetensors")
    gen = torch.Generator().manual_seed(2)
    for key, value in weights.items():
        if key.endswith("3.weight"):  # the MLPs' output layers
            weights[key] = (value + 0.5 * torch.randn(value.shape, generator=gen)).contiguous()
    save_file(weights, lora_dir / "collab.safetensors")


@pytest.fixture(scope="module")
def collab_store(world: World, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collab")
    return export_shared_form(world, root, COLLAB_VERSION, "--collab-tokens", adjust=perturb_projector)


class CollabReference(Reference):
    """P(Yes) of whole prompts by the transformers forward, the projector's vectors put in place of
    the placeholders' embeddings as training puts them."""

    def llm_scores(self, user_id: str, candidates, user_rep: torch.Tensor | None = None) -> np.ndarray:
        from training.llm.collab import collab_embeds, unit_vectors
        from training.llm.scoring import score_sequences

        dense = self.model.catalog.to_dense(candidates)
        crm_rep = self.crm(user_id, candidates).user_rep.reshape(1, -1)
        rep = crm_rep if user_rep is None else user_rep.reshape(1, -1)
        placeholder = self.builder.collab_id
        prefix, suffixes = self.sequences(user_id, candidates)
        to_placeholder = lambda ids: [placeholder if t >= EMBED_ID_BASE else t for t in ids]  # noqa: E731
        prompts = [to_placeholder(prefix + s) for s in suffixes]
        items = self.model.crm_item_table[torch.as_tensor(dense)]

        def embeds(rows, ids, mask):
            vectors = unit_vectors(self.model.collab, rep.expand(len(rows), -1), items[rows], [1] * len(rows))
            return collab_embeds(self.llm, ids, placeholder, vectors, mask)

        return score_sequences(self.llm, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               rows_context=lambda rows: self.lora.user(crm_rep), embeds=embeds).numpy()


@pytest.fixture(scope="module")
def reference(world: World, collab_store: Path) -> CollabReference:
    return CollabReference(world, collab_store / COLLAB_VERSION)


@pytest.fixture(scope="module")
def engine(world: World, reference: CollabReference):
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import TorchEngine

    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32, local_files_only=True)
    return TorchEngine(llm, yes_id=reference.builder.yes_id, no_id=reference.builder.no_id,
                       target_modules=reference.model.lora_config.target_modules)


@pytest.fixture(scope="module")
def collab_server(world: World, collab_store: Path) -> Iterator[LiveServer]:
    with serving_float32(world, collab_store, COLLAB_VERSION) as server:
        yield server


def test_the_run_and_the_bundle_record_the_collab_tokens(collab_store: Path, reference: CollabReference) -> None:
    bundle = collab_store / COLLAB_VERSION
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["components"]["llm"]["config"]["collab_tokens"] is True
    assert {"collab/config.json", "collab/weights.safetensors"} <= {f["path"] for f in manifest["files"]}
    assert json.loads((bundle / "prompt" / "config.json").read_text())["collab_tokens"] is True
    model = reference.model
    assert model.collab is not None and model.collab.cfg.user_dim == model.crm_config.user_dim
    prefix, suffixes = reference.sequences(reference.world.users[0], CANDIDATES)
    assert prefix[-1] == EMBED_ID_BASE  # the user's token closes the prefix
    assert [[t for t in s if t >= EMBED_ID_BASE] for s in suffixes] == [[EMBED_ID_BASE + 1 + j]
                                                                         for j in range(len(suffixes))]


def test_the_engine_scores_as_a_whole_prompt_forward_with_the_vectors(world: World, reference: CollabReference,
                                                                      engine) -> None:
    from service.scoring.sequence import score_sequence

    model, builder = reference.model, reference.builder
    for user in world.users[:2]:
        result = score_sequence(model, builder, engine, None, user, reference.view(user),
                                model.catalog.to_dense(CANDIDATES))
        assert result.prompts.embeds is not None and len(result.prompts.embeds) == 1 + len(CANDIDATES)
        np.testing.assert_allclose(result.scored.llm, reference.llm_scores(user, CANDIDATES), atol=ATOL, rtol=0)


def test_other_crm_vectors_give_other_scores_and_never_share_a_run(world: World, reference: CollabReference,
                                                                   engine) -> None:
    """The same tokens and adapter with two users' CRM vectors: other scores, each as its own
    whole-prompt forward, also when the two calls share one packed forward."""
    from service.scoring.stages import run_crm, text_inputs, user_adapter, with_collab_embeds

    model, user, other = reference.model, world.users[0], world.users[1]
    dense = model.catalog.to_dense(CANDIDATES)
    view = reference.view(user)
    own = run_crm(model, view, dense).user_rep
    theirs = run_crm(model, reference.view(other), dense).user_rep
    assert not torch.equal(own, theirs)
    prompts = text_inputs(reference.builder, model, view, dense)
    adapter = user_adapter(model, user, own, None, engine)
    calls = [EngineCall(adapter, prompts.prefix, prompts.suffixes,
                        embeds=with_collab_embeds(model, prompts, rep, dense).embeds) for rep in (own, theirs)]
    alone = [engine.score(c.adapter, c.prefix, c.suffixes, embeds=c.embeds) for c in calls]
    packed = engine.score_many(calls)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3
    for got, want, rep in zip(packed, alone, (own, theirs)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(want, reference.llm_scores(user, CANDIDATES, rep), atol=ATOL, rtol=0)


@pytest.mark.parametrize("route, listed", [("/v1/score", "scores"), ("/v1/explain", "candidates")])
def test_the_gateway_scores_and_explains_with_the_collab_tokens(world: World, reference: CollabReference,
                                                                 collab_server: LiveServer, route: str,
                                                                 listed: str) -> None:
    user = world.users[0 if route == "/v1/score" else 1]
    with collab_server.client() as http:
        response = http.post(route, json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == COLLAB_VERSION and not body.get("degraded") and body.get("llm_computed", True)
    served = np.asarray([s["llm_score"] for s in body[listed]], np.float64)
    np.testing.assert_allclose(served, reference.llm_scores(user, CANDIDATES), atol=ATOL, rtol=0)


def test_an_engine_without_input_embeddings_refuses_the_version(world: World, reference: CollabReference) -> None:
    from service.engine.vllm.engine import VLLMEngine

    spec = BaseModelSpec.from_pretrained_config(world.base_dir)
    with pytest.raises(ValidationFailed) as refused:
        check_collab(reference.model, spec, VLLMEngine.__new__(VLLMEngine))
    assert refused.value.reason is RefusalReason.INCOMPATIBLE and "collaborative tokens" in str(refused.value)
    # The gateway's startup asks the same question of the engine it built, and the embedded engine passes.
    assert collab_engine_refusal(reference.model, VLLMEngine.__new__(VLLMEngine)) in str(refused.value)
    assert collab_engine_refusal(reference.model, TorchEngine.__new__(TorchEngine)) is None
    with pytest.raises(ValueError, match="input embeddings"):
        VLLMEngine.score(VLLMEngine.__new__(VLLMEngine), None, [1], [[2]], embeds=torch.zeros(1, 4))


@pytest.mark.parametrize("drop", ["manifest", "prompt"])
def test_a_bundle_whose_parts_disagree_on_collab_tokens_is_refused(collab_store: Path, tmp_path: Path,
                                                                   drop: str) -> None:
    """A LoRA trained with the tokens and a prompt without them (or the reverse) reads other inputs
    than it learned on: the load refuses it."""
    out = tmp_path / COLLAB_VERSION
    shutil.copytree(collab_store / COLLAB_VERSION, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if drop == "manifest":
        del manifest["components"]["llm"]["config"]["collab_tokens"]
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    else:
        from service.bundle import file_sha256

        path = out / "prompt" / "config.json"
        prompt = json.loads(path.read_text())
        del prompt["collab_tokens"], prompt["version"]
        path.write_text(json.dumps(prompt))
        entry = next(e for e in manifest["files"] if e["path"] == "prompt/config.json")
        entry["sha256"], entry["size"] = file_sha256(path), path.stat().st_size  # the reader checks both
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValidationFailed) as refused:
        load_candidate(out)
    assert refused.value.reason is RefusalReason.PROMPT_MISMATCH, str(refused.value)
