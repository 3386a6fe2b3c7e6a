"""The one scoring sequence: the request pipeline, shadow scoring and the registry's smoke test
give the same scores for the same snapshot and request on the real embedded engine, and a
version that serves its CRM runs no LLM on any of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from service.config import AdapterCacheSettings, RequestSettings
from service.engine.torch_engine import TorchEngine
from service.history import HistorySettings, HistoryStore
from service.model import ModelHolder
from service.model.fusion import ScoreSource
from service.personalization.adapter_cache import AdapterCache
from service.registry.validation import ValidationReport, golden_requests, score_golden, smoke_test
from service.scoring.pipeline import ScoringPipeline
from service.scoring.sequence import score_sequence
from service.scoring.shadow import StoredHistory, shadow_score
from service.scoring.stages import UserHistoryView
from tests.redis_support import REDIS_URL

CANDIDATES = [3, 11, 17, 29, 42]
ADAPTER_CACHE = AdapterCacheSettings(adapter_cache_bytes=64 << 20)
REQUESTS = RequestSettings(default_deadline_ms=600_000, max_deadline_ms=600_000, history_budget_ms=5_000,
                           llm_min_ms=1.0, llm_admission="pace")


class CountingEngine:
    """The real embedded engine, counting the forwards asked of it."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine, self.calls = engine, 0

    def score(self, *args, **kwargs) -> np.ndarray:
        self.calls += 1
        return self.engine.score(*args, **kwargs)

    def expected_ms(self, prefix, suffixes) -> float | None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def engine(world, loaded) -> CountingEngine:
    model, builder = loaded
    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32, local_files_only=True)
    return CountingEngine(TorchEngine(llm, yes_id=builder.yes_id, no_id=builder.no_id,
                                      target_modules=model.lora_config.target_modules))


def serving_crm(model):
    """The world's version as an export that found its fusion no better than the CRM decides it."""
    return dataclasses.replace(model, fusion=dataclasses.replace(model.fusion, serve=ScoreSource.CRM.value))


def stored_of(world, user: str) -> StoredHistory:
    items, ratings, _, profile = world.histories[user]
    return StoredHistory(np.asarray(items, np.int64), np.asarray(ratings, np.float32), profile)


def view_of(model, stored: StoredHistory) -> UserHistoryView:
    return UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile)


async def pipeline_answer(world, model, builder, engine, user: str):
    history = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=world.prefix))
    pipeline = ScoringPipeline(history=history, holder=ModelHolder(model, builder), engine=engine,
                               adapters=AdapterCache(ADAPTER_CACHE), settings=REQUESTS)
    try:
        return await pipeline.score(user, CANDIDATES)
    finally:
        pipeline.close()
        await history.aclose()


@pytest.mark.anyio
async def test_pipeline_shadow_and_smoke_paths_score_alike(world, loaded, engine):
    model, builder = loaded
    user = world.users[1]
    stored = stored_of(world, user)
    dense = model.catalog.to_dense(CANDIDATES)

    answer = await pipeline_answer(world, model, builder, engine, user)
    assert not answer.degraded and answer.score_source is ScoreSource.FUSED
    served = np.array([c.score for c in answer.candidates])
    llm = np.array([c.llm_score for c in answer.candidates])
    crm = np.array([c.crm_score for c in answer.candidates])

    shadow = shadow_score(ModelHolder(model, builder).snapshot(), builder, engine, AdapterCache(ADAPTER_CACHE), user,
                          stored, CANDIDATES, lambda: False)
    smoke = score_golden(model, engine, builder, 0, view_of(model, stored), dense)
    for scored in (shadow, smoke):  # the same steps; float32 matmuls may round rows apart by ~1e-7 on some CPUs
        assert scored.source is ScoreSource.FUSED
        np.testing.assert_allclose(scored.final, served, rtol=0, atol=1e-6)
        np.testing.assert_allclose(scored.llm, llm, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(scored.crm.astype(np.float64), crm)
    assert not np.allclose(served, crm), "the fused score must differ from the CRM's, or the test proves nothing"


@pytest.mark.anyio
async def test_a_version_serving_its_crm_runs_no_llm_on_any_path(world, loaded, engine):
    model, builder = loaded
    crm_model = serving_crm(model)
    user = world.users[1]
    stored = stored_of(world, user)
    before = engine.calls

    report = ValidationReport(crm_model.version)
    smoke_test(crm_model, engine, builder, report)
    shadow = shadow_score(ModelHolder(crm_model, builder).snapshot(), builder, engine, AdapterCache(ADAPTER_CACHE),
                          user, stored, CANDIDATES, lambda: False)
    answer = await pipeline_answer(world, crm_model, builder, engine, user)
    assert engine.calls == before, "a version that serves its CRM ran the LLM"

    assert answer.score_source is ScoreSource.CRM and all(c.llm_score is None for c in answer.candidates)
    assert [c.score for c in answer.candidates] == [c.crm_score for c in answer.candidates]
    assert shadow.source is ScoreSource.CRM and np.isnan(shadow.llm).all()
    np.testing.assert_array_equal(shadow.final, [c.score for c in answer.candidates])
    assert len(report.smoke_scores) == 3
    for row in report.smoke_scores:  # the served scores: the CRM's
        assert all(0.0 <= s <= 1.0 for s in row)


def test_smoke_test_records_the_served_scores_of_an_llm_version(world, loaded, engine):
    model, builder = loaded
    report = ValidationReport(model.version)
    smoke_test(model, engine, builder, report)
    for i, (view, candidates) in enumerate(golden_requests(model)):
        direct = score_sequence(model, builder, engine, None, f"smoke-{i}", view, candidates).scored
        assert direct.source is ScoreSource.FUSED
        np.testing.assert_array_equal(report.smoke_scores[i], direct.final)
