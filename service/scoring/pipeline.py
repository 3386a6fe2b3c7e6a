"""POST /v1/score as a sequence of timed stages inside one deadline, degrading instead of failing.

history (Redis, one round trip) -> two branches at once: the CRM over the long history (scores
+ user vector), and per candidate semantic retrieval of the short text history then the prompts
-> the user's adapter (gate on the CRM's user vector, cache, materialize) -> the LLM engine on all
candidates at once -> fusion. The branches need nothing from each other, so they overlap on two
threads (torch, FAISS and the tokenizer release the GIL) instead of adding up. When Redis is
unreachable the user is scored as cold start; when the LLM fails or would overrun the deadline
the CRM scores are returned; both say ``degraded`` and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from redis.exceptions import RedisError

from service.engine.base import ScoringEngine
from service.history import HistoryReader
from service.llm.prompt import PromptBuilder
from service.model import LoadedModel, ModelHolder
from service.personalization.adapter_cache import AdapterCache
from service.scoring.contracts import CandidateResult, DegradedReason, ScoreResult, UnknownItems
from service.scoring.stages import UserHistoryView, build_adapter, build_prompts, retrieve_text_history, run_crm

log = logging.getLogger(__name__)


def llm_admission(remaining_ms: float, expected_ms: float | None, llm_min_ms: float) -> DegradedReason | None:
    """Why the LLM stage is skipped with ``remaining_ms`` left, or None to run it.

    Skipped when too little time is left, or when the engine's recent pace says the forward would
    overrun: an abandoned forward costs the engine time every queued request waits for, and
    answers no sooner than the CRM scores would."""
    if remaining_ms < llm_min_ms:
        return DegradedReason.DEADLINE
    if expected_ms is not None and remaining_ms < expected_ms:
        return DegradedReason.LLM_OVERRUN_EXPECTED
    return None


class ScoringPipeline:
    """The ``Scorer`` of the service: one request's stages inside its deadline."""

    def __init__(self, *, history: HistoryReader, holder: ModelHolder, engine: ScoringEngine | None,
                 cache: AdapterCache,
                 default_deadline_ms: int, history_budget_ms: float, llm_min_ms: float,
                 observe_stage: Callable[[str, float], None] = lambda stage, ms: None,
                 observe_degraded: Callable[[DegradedReason], None] = lambda reason: None) -> None:
        self.history, self.holder, self.engine, self.cache = history, holder, engine, cache
        self.default_deadline_ms = default_deadline_ms
        self.history_budget_ms = history_budget_ms
        self.llm_min_ms = llm_min_ms
        self.observe_stage, self.observe_degraded = observe_stage, observe_degraded
        # The engine serializes forwards; one worker keeps requests queued in arrival order.
        self._engine_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # The CRM on a thread of its own too: torch gives every thread that runs ops its own pool of
        # intra-op threads, so one thread (rather than asyncio's shared pool) keeps one pool warm.
        self._crm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm")
        # Retrieval and prompts beside the CRM; one worker, so the prompt builder's token cache
        # is only ever touched by one thread.
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        """The ids in ``ids`` that the active catalog does not know."""
        return self.holder.snapshot().model.catalog.unknown(ids)

    @property
    def model_version(self) -> str:
        return self.holder.version

    def close(self) -> None:
        self._engine_pool.shutdown(wait=False, cancel_futures=True)
        self._crm_pool.shutdown(wait=False, cancel_futures=True)
        self._text_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:  # remote engines hold connections and a monitor
            self.engine.close()

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        start = time.perf_counter()
        deadline = start + (deadline_ms or self.default_deadline_ms) / 1000.0
        snapshot = self.holder.snapshot()  # the one version this request sees, from the catalog check on
        model, builder = snapshot.model, snapshot.builder
        unknown = model.catalog.unknown(candidates)
        if unknown:
            raise UnknownItems(unknown, model.version)
        timings: dict[str, float] = {}
        reasons: list[DegradedReason] = []

        def record(stage: str, ms: float) -> None:
            timings[stage] = ms
            self.observe_stage(stage, ms)

        def lap(stage: str, t0: float) -> float:
            record(stage, (time.perf_counter() - t0) * 1000.0)
            return time.perf_counter()

        t = time.perf_counter()
        try:
            stored = await asyncio.wait_for(self.history.read(user_id), self.history_budget_ms / 1000.0)
            raw_items, ratings, profile, exists = stored.items, stored.ratings, stored.profile, stored.exists
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("history unavailable, scoring as cold start", extra={"error": repr(exc)})
            raw_items, ratings, profile, exists = np.zeros(0, np.int64), np.zeros(0, np.float32), {}, False
            reasons.append(DegradedReason.HISTORY_UNAVAILABLE)
        t = lap("history", t)
        view = UserHistoryView.from_raw(model, raw_items, ratings, profile)
        dense = model.catalog.to_dense(candidates)
        loop = asyncio.get_running_loop()
        uses_llm = model.mixer is not None and self.engine is not None and builder is not None  # else CRM only
        text = (loop.run_in_executor(self._text_pool, _text_side, builder, model, view, dense)
                if uses_llm else None)
        try:
            crm, crm_ms = await loop.run_in_executor(self._crm_pool, _timed, run_crm, model, view, dense)
        except BaseException:
            if text is not None:
                text.cancel()
            raise
        record("crm", crm_ms)

        llm = None
        if text is not None:
            try:
                prompts, retrieval_ms, prompts_ms = await text
                record("retrieval", retrieval_ms)
                record("prompts", prompts_ms)
                t = time.perf_counter()
                alphas = model.mixer.mixtures(crm.user_rep)
                adapter, _ = self.cache.get_or_build(user_id, model.version, alphas,
                                                     lambda a: build_adapter(model, user_id, a))
                t = lap("adapter", t)
                prefix, suffixes = prompts
                remaining = deadline - time.perf_counter()
                skip = llm_admission(remaining * 1000.0, self.engine.expected_ms(prefix, suffixes), self.llm_min_ms)
                if skip is not None:
                    reasons.append(skip)
                else:
                    future = loop.run_in_executor(self._engine_pool, self.engine.score, adapter, prefix, suffixes,
                                                  deadline)
                    llm = await asyncio.wait_for(future, remaining)
                    t = lap("llm", t)
            except (asyncio.TimeoutError, TimeoutError):  # waited too long, or the engine gave up
                reasons.append(DegradedReason.LLM_TIMEOUT)
            except Exception:  # the LLM stage must never turn an answer into a 5xx
                log.exception("LLM stage failed; answering with CRM scores")
                reasons.append(DegradedReason.LLM_ERROR)

        if llm is not None and model.fusion is not None:
            final = model.fusion(llm, crm.scores)
        elif llm is not None:
            final = llm
        else:
            final = crm.scores
        for reason in reasons:
            self.observe_degraded(reason)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        self.observe_stage("total", timings["total"])
        return ScoreResult(
            user_id=user_id, model_version=model.version,
            candidates=[CandidateResult(int(c), float(s), None if llm is None else float(l), float(k))
                        for c, s, l, k in zip(candidates, final, llm if llm is not None else [None] * len(dense), crm.scores)],
            degraded=bool(reasons), degraded_reasons=reasons, cold_start=not exists, timings_ms=timings)


def _timed(fn: Callable, *args):
    """``(fn(*args), milliseconds it took)``, timed on the thread that runs it."""
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1000.0


def _text_side(builder: PromptBuilder, model: LoadedModel, view: UserHistoryView,
               dense: np.ndarray) -> tuple[tuple[list[int], list[list[int]]], float, float]:
    """The LLM's inputs that need nothing from the CRM: per candidate retrieval, then the prompts;
    returns the prompts and each step's milliseconds."""
    histories, retrieval_ms = _timed(retrieve_text_history, model, view, dense)
    prompts, prompts_ms = _timed(build_prompts, builder, model, view, dense, histories)
    return prompts, retrieval_ms, prompts_ms
