"""POST /v1/score as a sequence of timed stages inside one deadline, degrading instead of failing.

history (Redis, one round trip) -> two branches at once: the CRM over the long history (scores
+ user vector), and per candidate semantic retrieval of the short text history then the prompts
-> the user's adapter (gate on the CRM's user vector, cache, materialize) -> LLM scores: cached
ones from Redis, the rest from the engine when the work queued on it and this request's own
forward fit in the time left, else the CRM's now and a background job that scores them for the
next visit -> fusion. The branches need nothing from each other, so they overlap on two threads
(torch, FAISS and the tokenizer release the GIL) instead of adding up. When Redis is unreachable
the user is scored as cold start; when the LLM fails or would overrun the deadline the CRM scores
are returned; both say ``degraded`` and why.

During a canary the request's one snapshot routes the user to the stable version or the
candidate, and names the version that scored it; with a shadow canary the candidate scores the
same request as a background job. Each answer's scores (and each shadow's) go to the served-score
log off the request path; an answer of a candidate aborted while it ran never leaves: the request
is scored anew on the version that serves now.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError

from service.engine.base import ScoringEngine, UserAdapter
from service.history import HistoryReader, KnowledgeRecord
from service.logging import BurstLog
from service.llm.prompt import PromptBuilder
from service.model import LoadedModel, ModelHolder, ModelSnapshot
from service.model.fusion import ScoreSource
from service.nearline.score_cache import LLMScoreCache
from service.nearline.served_log import ServedLog, ServedScore
from service.personalization.adapter_cache import AdapterCache
from service.scoring.contracts import (Admission, CandidateResult, CandidateSource, DegradedReason, Overloaded,
                                       ScoreResult, ServedOutcome, UnknownItems)
from service.scoring.engine_scheduler import EngineScheduler
from service.scoring.shadow import ShadowBuilders, ShadowScores, StoredHistory, shadow_score
from service.scoring.stages import (UserHistoryView, answer_source, build_adapter, build_prompts,
                                    retrieve_text_history, run_crm)
from service.scoring.user_knowledge import KnowledgeOutcome, serve_knowledge

log = logging.getLogger(__name__)
burst = BurstLog(log)


def llm_admission(remaining_ms: float, expected_ms: float | None, llm_min_ms: float,
                  backlog_ms: float = 0.0) -> DegradedReason | None:
    """Why the LLM stage is skipped with ``remaining_ms`` left, or None to run it.

    Skipped when too little time is left, when the engine's recent pace says this request's own
    forward would overrun, or when it would overrun after the work already queued on the engine
    (``backlog_ms``): an abandoned forward costs the engine time every queued request waits for,
    and answers no sooner than the CRM scores would."""
    if remaining_ms < llm_min_ms:
        return DegradedReason.DEADLINE
    if expected_ms is not None and remaining_ms < expected_ms:
        return DegradedReason.LLM_OVERRUN_EXPECTED
    if remaining_ms < backlog_ms + (expected_ms or 0.0):
        return DegradedReason.LLM_QUEUE
    return None


ADMISSION_OF = {DegradedReason.DEADLINE: Admission.DEADLINE, DegradedReason.LLM_OVERRUN_EXPECTED: Admission.OVERRUN,
                DegradedReason.LLM_QUEUE: Admission.QUEUE}


def prompt_fingerprints(adapter: UserAdapter, view: UserHistoryView, prefix: Sequence[int],
                        suffixes: Sequence[Sequence[int]]) -> list[str]:
    """Per candidate, a digest of everything its LLM score depends on: the adapter's content (its
    key names user, version and mixture), the stored history and profile the request read, and
    the prompt's tokens. Equal digests mean equal inputs, so a cached score equals a fresh one."""
    base = hashlib.blake2b(digest_size=16)
    base.update(adapter.key.encode())
    base.update(view.items.tobytes())
    base.update(view.ratings.tobytes())
    base.update(repr(sorted(view.profile.items())).encode())
    base.update(np.asarray(prefix, np.int64).tobytes())
    out = []
    for suffix in suffixes:
        h = base.copy()
        h.update(b"|")
        h.update(np.asarray(suffix, np.int64).tobytes())
        out.append(h.hexdigest())
    return out


@dataclass
class ScoringEvents:
    """Metrics hooks of the pipeline."""

    stage: Callable[[str, float], None] = lambda stage, ms: None
    degraded: Callable[[DegradedReason], None] = lambda reason: None
    admission: Callable[[Admission], None] = lambda outcome: None
    candidates: Callable[[CandidateSource, int], None] = lambda source, n: None
    score_cache: Callable[[str, int], None] = lambda outcome, n: None  # hit | miss | error | write_error
    served: Callable[[str, ServedOutcome, float], None] = lambda version, outcome, ms: None  # per answer
    shadow: Callable[[str], None] = lambda outcome: None  # queued | not_queued | unscorable
    knowledge: Callable[[KnowledgeOutcome, float | None], None] = lambda outcome, age_s: None  # per request


class LoopLag:
    """How late the event loop runs its callbacks now (the largest delay over the last second),
    so a Redis budget can count Redis rather than the wait for the loop."""

    PERIOD_S = 0.02

    def __init__(self) -> None:
        self.samples: list[float] = [0.0]
        self._task: asyncio.Task | None = None

    @property
    def ms(self) -> float:
        return max(self.samples)

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-lag")

    async def _watch(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.PERIOD_S)
            self.samples.append(max((time.perf_counter() - start - self.PERIOD_S) * 1000.0, 0.0))
            del self.samples[:-int(1.0 / self.PERIOD_S)]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class ScoringPipeline:
    """The ``Scorer`` of the service: one request's stages inside its deadline."""

    def __init__(self, *, history: HistoryReader, holder: ModelHolder, engine: ScoringEngine | None,
                 cache: AdapterCache, default_deadline_ms: int, history_budget_ms: float, llm_min_ms: float,
                 scheduler: EngineScheduler | None = None, scores: LLMScoreCache | None = None,
                 score_cache_budget_ms: float = 50.0, max_cpu_queue: int = 64, queue_aware: bool = True,
                 events: ScoringEvents | None = None, served_log: ServedLog | None = None) -> None:
        self.history, self.holder, self.engine, self.cache = history, holder, engine, cache
        self.default_deadline_ms = default_deadline_ms
        self.history_budget_ms = history_budget_ms
        self.llm_min_ms = llm_min_ms
        self.scores, self.score_cache_budget_ms = scores, score_cache_budget_ms
        self.max_cpu_queue = max_cpu_queue
        self.queue_aware = queue_aware
        self.events = events or ScoringEvents()
        self.served_log = served_log
        self._shadow_builders = ShadowBuilders()  # touched by the engine thread only
        # The engine runs one forward at a time; requests before background work (see EngineScheduler).
        self.scheduler = scheduler or (EngineScheduler() if engine is not None else None)
        # The CRM on a thread of its own too: torch gives every thread that runs ops its own pool of
        # intra-op threads, so one thread (rather than asyncio's shared pool) keeps one pool warm.
        self._crm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm")
        # Retrieval and prompts beside the CRM; one worker, so the prompt builder's token cache
        # is only ever touched by one thread.
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")
        self._cpu_queued = 0  # requests between entering the CRM queue and leaving it (event loop only)
        self._writes: set[asyncio.Task] = set()  # score-cache writes in flight, off the request path
        self.loop_lag = LoopLag()

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        """The ids in ``ids`` that the active catalog does not know."""
        return self.holder.snapshot().model.catalog.unknown(ids)

    @property
    def model_version(self) -> str:
        return self.holder.version

    def close(self) -> None:
        self.loop_lag.stop()
        if self.served_log is not None:
            self.served_log.close()
        if self.scheduler is not None:
            self.scheduler.close()
        self._crm_pool.shutdown(wait=False, cancel_futures=True)
        self._text_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:  # remote engines hold connections and a monitor
            self.engine.close()

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        start = time.perf_counter()
        deadline = start + (deadline_ms or self.default_deadline_ms) / 1000.0
        # The one read of the versions (stable, candidate, share) this request makes: it routes the
        # user, and the version it gives scores everything from the catalog check on.
        snapshot, shadow = self.holder.snapshot().route(user_id)
        try:
            result, stored = await self._score(snapshot, user_id, candidates, start, deadline)
            if self.holder.withdrawn(result.model_version):  # the candidate was aborted meanwhile
                snapshot, shadow = self.holder.snapshot().route(user_id)
                result, stored = await self._score(snapshot, user_id, candidates, start, deadline)
        except (UnknownItems, Overloaded):
            raise
        except Exception:
            self.events.served(snapshot.version, ServedOutcome.ERROR, (time.perf_counter() - start) * 1000.0)
            raise
        self.events.served(result.model_version, ServedOutcome.DEGRADED if result.degraded else ServedOutcome.OK,
                           result.timings_ms["total"])
        if self.served_log is not None:
            at_ms = int(time.time() * 1000)
            self.served_log.offer([ServedScore(request_id, user_id, c.item_id, result.model_version, c.score,
                                               c.llm_score, c.crm_score, at_ms) for c in result.candidates])
            if shadow is not None:
                self._shadow(shadow, request_id, user_id, candidates, stored)
        return result

    async def _score(self, snapshot: ModelSnapshot, user_id: str, candidates: Sequence[int], start: float,
                     deadline: float) -> tuple[ScoreResult, StoredHistory]:
        """One version's answer, and the history it read (for a shadow to score the same)."""
        model, builder = snapshot.model, snapshot.builder
        unknown = model.catalog.unknown(candidates)
        if unknown:
            raise UnknownItems(unknown, model.version)
        if self._cpu_queued >= self.max_cpu_queue:
            raise Overloaded(f"{self._cpu_queued} requests wait for the CRM; at most {self.max_cpu_queue}")
        self.loop_lag.ensure_running()
        timings: dict[str, float] = {}
        reasons: list[DegradedReason] = []

        def record(stage: str, ms: float) -> None:
            timings[stage] = ms
            self.events.stage(stage, ms)

        def lap(stage: str, t0: float) -> float:
            record(stage, (time.perf_counter() - t0) * 1000.0)
            return time.perf_counter()

        t = time.perf_counter()
        try:
            # The budget is Redis's: time the event loop is late running callbacks is not held against it.
            budget_s = (self.history_budget_ms + self.loop_lag.ms) / 1000.0
            stored = await asyncio.wait_for(self.history.read(user_id), budget_s)
            raw_items, ratings, profile, exists = stored.items, stored.ratings, stored.profile, stored.exists
            knowledge, knowledge_error = stored.knowledge, stored.knowledge_error
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            burst.log(logging.WARNING, "history", "history unavailable, scoring as cold start", error=repr(exc))
            raw_items, ratings, profile, exists = np.zeros(0, np.int64), np.zeros(0, np.float32), {}, False
            knowledge = knowledge_error = None
            reasons.append(DegradedReason.HISTORY_UNAVAILABLE)
        t = lap("history", t)
        view = UserHistoryView.from_raw(model, raw_items, ratings, profile,
                                        self._knowledge(model, knowledge, knowledge_error))
        dense = model.catalog.to_dense(candidates)
        loop = asyncio.get_running_loop()
        made_by = answer_source(model, self.engine, builder)  # CRM alone: no prompt, adapter, forward or job
        uses_llm = made_by is not ScoreSource.CRM
        text = (loop.run_in_executor(self._text_pool, _text_side, builder, model, view, dense)
                if uses_llm else None)
        self._cpu_queued += 1
        try:
            crm, crm_ms = await loop.run_in_executor(self._crm_pool, _timed, run_crm, model, view, dense)
        except BaseException:
            if text is not None:
                text.cancel()
            raise
        finally:
            self._cpu_queued -= 1
        record("crm", crm_ms)

        llm = np.full(len(dense), np.nan)  # NaN: no LLM score for that candidate
        sources = [CandidateSource.NONE] * len(dense)
        if text is not None:
            await self._llm_stage(user_id, model, view, text, crm.user_rep, deadline, llm, sources, reasons, record,
                                  lap)
        has = ~np.isnan(llm)
        if has.any() and not has.all():
            reasons.append(DegradedReason.LLM_PARTIAL)
        final = np.asarray(crm.scores, np.float64).copy()
        if has.any():
            final[has] = model.fusion(llm[has], crm.scores[has]) if model.fusion is not None else llm[has]
        for reason in reasons:
            self.events.degraded(reason)
        for source in CandidateSource:
            n = sum(s is source for s in sources)
            if n:
                self.events.candidates(source, n)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        self.events.stage("total", timings["total"])
        return ScoreResult(
            user_id=user_id, model_version=model.version,
            candidates=[CandidateResult(int(c), float(s), None if np.isnan(l) else float(l), float(k))
                        for c, s, l, k in zip(candidates, final, llm, crm.scores)],
            degraded=bool(reasons), degraded_reasons=reasons, cold_start=not exists, score_source=made_by,
            timings_ms=timings), StoredHistory(raw_items, ratings, profile, knowledge)

    def _knowledge(self, model: LoadedModel, record: KnowledgeRecord | None, error: str | None) -> np.ndarray | None:
        """The user's stored knowledge vector when ``model`` reads it, else None (the CRM's default)."""
        served = serve_knowledge(model, record, error)
        if served.outcome is not None:
            if error:
                burst.log(logging.WARNING, "knowledge-record", "malformed knowledge record, serving the default",
                          error=error)
            self.events.knowledge(served.outcome, served.age_s)
        return served.vector

    def _shadow(self, snapshot: ModelSnapshot, request_id: str, user_id: str, candidates: Sequence[int],
                stored: StoredHistory) -> None:
        """Score the request with the shadow candidate when the engine is free; record, never serve."""
        if self.scheduler is None:
            self.events.shadow("not_queued")
            return
        loop, engine, cache, builders = asyncio.get_running_loop(), self.engine, self.cache, self._shadow_builders
        request_id = request_id or uuid.uuid4().hex
        items = list(candidates)

        def work(interrupted):
            scored = shadow_score(snapshot, builders.of(snapshot), engine, cache, user_id, stored, items, interrupted)
            if scored is None:
                loop.call_soon_threadsafe(self.events.shadow, "unscorable")
                return
            loop.call_soon_threadsafe(self._record_shadow, request_id, user_id, snapshot.version, items, scored)

        queued = self.scheduler.submit_background(("shadow", snapshot.version, request_id), work, 0.0)
        self.events.shadow("queued" if queued else "not_queued")

    def _record_shadow(self, request_id: str, user_id: str, version: str, candidates: list[int],
                       scored: ShadowScores) -> None:
        at_ms = int(time.time() * 1000)
        llm = scored.llm if scored.llm is not None else [None] * len(candidates)
        self.served_log.offer([ServedScore(request_id, user_id, int(c), version, float(s),
                                           None if l is None else float(l), float(k), at_ms, shadow=True)
                               for c, s, l, k in zip(candidates, scored.score, llm, scored.crm)])

    async def _llm_stage(self, user_id: str, model: LoadedModel, view: UserHistoryView, text: asyncio.Future,
                         user_rep, deadline: float, llm: np.ndarray, sources: list[CandidateSource],
                         reasons: list[DegradedReason], record, lap) -> None:
        """Fill ``llm`` (and ``sources``) with what the cache and the engine can give in time."""
        fields: list[str] | None = None
        misses: list[int] = []
        adapter = prefix = suffixes = None
        try:
            prompts, retrieval_ms, prompts_ms = await text
            record("retrieval", retrieval_ms)
            record("prompts", prompts_ms)
            t = time.perf_counter()
            alphas = model.mixer.mixtures(user_rep)
            adapter, _ = self.cache.get_or_build(user_id, model.version, alphas,
                                                 lambda a: build_adapter(model, user_id, a))
            t = lap("adapter", t)
            prefix, suffixes = prompts
            if self.scores is not None:
                fields = prompt_fingerprints(adapter, view, prefix, suffixes)
                cached = await self._cached(user_id, model.version, fields)
                for i, value in enumerate(cached):
                    if value is not None:
                        llm[i], sources[i] = value, CandidateSource.CACHED
                t = lap("llm_cache", t)
            misses = [i for i in range(len(llm)) if np.isnan(llm[i])]
            if not misses:
                self.events.admission(Admission.CACHED)
                return
            miss_suffixes = [suffixes[i] for i in misses]
            remaining_ms = (deadline - time.perf_counter()) * 1000.0
            expected = self.engine.expected_ms(prefix, miss_suffixes)
            backlog = self.scheduler.backlog_ms() if self.queue_aware else 0.0
            skip = llm_admission(remaining_ms, expected, self.llm_min_ms, backlog)
            if skip is not None:
                self.events.admission(ADMISSION_OF[skip])
                reasons.append(skip)
                self._score_later(user_id, model.version, adapter, prefix, suffixes, misses, fields, expected)
                return
            self.events.admission(Admission.LIVE)
            engine = self.engine

            def work(interrupted):
                return engine.score(adapter, prefix, miss_suffixes, deadline)

            future = self.scheduler.submit(work, expected if expected is not None else remaining_ms, deadline)
            scored = await asyncio.wait_for(asyncio.wrap_future(future), max(remaining_ms, 0.0) / 1000.0)
            llm[misses] = scored
            for i in misses:
                sources[i] = CandidateSource.LIVE
            lap("llm", t)
            if fields is not None:
                self._store(user_id, model.version, {fields[i]: float(s) for i, s in zip(misses, scored)})
        except (asyncio.TimeoutError, TimeoutError):  # waited too long, or the engine gave up
            reasons.append(DegradedReason.LLM_TIMEOUT)
            if adapter is not None and misses:
                self._score_later(user_id, model.version, adapter, prefix, suffixes, misses, fields, None)
        except Exception as exc:  # the LLM stage must never turn an answer into a 5xx
            burst.log(logging.ERROR, f"llm:{type(exc).__name__}", f"LLM stage failed, answering with CRM scores: "
                      f"{type(exc).__name__}: {exc}", exc_info=True)
            reasons.append(DegradedReason.LLM_ERROR)

    async def _cached(self, user_id: str, version: str, fields: list[str]) -> list[float | None]:
        """Cached scores within the cache's budget; a slow or failing Redis is all misses."""
        try:
            cached = await asyncio.wait_for(self.scores.get(user_id, version, fields),
                                            (self.score_cache_budget_ms + self.loop_lag.ms) / 1000.0)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            burst.log(logging.WARNING, "score-cache", "LLM score cache unavailable, scoring without it",
                      error=repr(exc))
            self.events.score_cache("error", len(fields))
            return [None] * len(fields)
        hits = sum(v is not None for v in cached)
        self.events.score_cache("hit", hits)
        self.events.score_cache("miss", len(fields) - hits)
        return cached

    def _store(self, user_id: str, version: str, scores: dict[str, float]) -> None:
        """Write scores to the cache off the request path: a slow or failed write delays nothing."""
        task = asyncio.get_running_loop().create_task(self._write(user_id, version, scores))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, user_id: str, version: str, scores: dict[str, float]) -> None:
        try:
            await self.scores.put(user_id, version, scores)
        except (RedisError, OSError) as exc:
            burst.log(logging.WARNING, "score-cache-write", "LLM score cache write failed", error=repr(exc))
            self.events.score_cache("write_error", len(scores))

    def _score_later(self, user_id: str, version: str, adapter: UserAdapter, prefix: Sequence[int],
                     suffixes: Sequence[Sequence[int]], misses: list[int], fields: list[str] | None,
                     expected_ms: float | None) -> None:
        """Queue the candidates without an LLM score for background scoring into the cache, so
        the user's next request finds them; nothing without a cache to put them in."""
        if fields is None or self.scheduler is None:
            return
        miss_fields = [fields[i] for i in misses]
        miss_suffixes = [suffixes[i] for i in misses]
        loop, engine = asyncio.get_running_loop(), self.engine

        def work(interrupted):
            scored = engine.score(adapter, prefix, miss_suffixes, None, interrupted)
            scores = {field: float(s) for field, s in zip(miss_fields, scored)}
            loop.call_soon_threadsafe(self._store, user_id, version, scores)

        key = (user_id, version, hashlib.blake2b("".join(miss_fields).encode(), digest_size=16).hexdigest())
        self.scheduler.submit_background(key, work, expected_ms or 0.0)


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
