"""POST /v1/score as a sequence of timed stages inside one deadline, degrading instead of failing.

The steps are the scoring sequence's (``service.scoring.sequence``, the same that shadow scoring
and the registry's smoke test run whole); this module adds the deadline, the score cache and the
fallbacks between them. history (Redis, one round trip) -> two branches at once: the CRM over the long history (scores
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
from dataclasses import dataclass, field

import numpy as np
import torch
from redis.exceptions import RedisError

from service.engine.base import Adapter, EngineCall, ScoringEngine
from service.config import RequestSettings
from service.llm.collab_tokens import EMBED_ID_BASE
from service.history import HistoryReader, KnowledgeRecord, UserHistory
from service.logging import BurstLog
from service.model import LoadedModel, ModelHolder, ModelSnapshot
from service.model.fusion import ScoreSource
from service.nearline.score_cache import LLMScoreCache
from service.nearline.served_log import ServedLog, ServedScore
from service.personalization.adapter_cache import AdapterCache
from service.retrieval.faiss_index import search_on_one_thread
from service.scoring.contracts import (Admission, CandidateResult, CandidateSource, DegradedReason, Overloaded,
                                       ScoreCacheOutcome, ScoreResult, ServedOutcome, ShadowOutcome, Stage,
                                       UnknownItems)
from service.scoring.engine_scheduler import EngineScheduler, set_thread_intra_op_threads
from service.scoring.sequence import Scored
from service.scoring.shadow import ShadowBuilders, StoredHistory, shadow_score
from service.scoring.stages import (Prompts, UserHistoryView, answer_source, run_crm, text_inputs, user_adapter,
                                    with_collab_embeds)
from service.scoring.user_knowledge import serve_knowledge
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry

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


def prompt_fingerprints(adapter: Adapter, view: UserHistoryView, prefix: Sequence[int],
                        suffixes: Sequence[Sequence[int]], embeds: torch.Tensor | None = None) -> list[str]:
    """Per candidate, a digest of everything its LLM score depends on: the adapter's content (its
    key names user, version and mixture), the stored history and profile the request read, and
    the prompt's tokens, with the rows its collaborative tokens read (``embeds``) in place of their
    call-relative ids. Equal digests mean equal inputs, so a cached score equals a fresh one."""
    base = hashlib.blake2b(digest_size=16)
    base.update(adapter.key.encode())
    base.update(view.items.tobytes())
    base.update(view.ratings.tobytes())
    base.update(repr(sorted(view.profile.items())).encode())
    _digest_tokens(base, prefix, embeds)
    out = []
    for suffix in suffixes:
        h = base.copy()
        h.update(b"|")
        _digest_tokens(h, suffix, embeds)
        out.append(h.hexdigest())
    return out


def _digest_tokens(h, tokens: Sequence[int], embeds: torch.Tensor | None) -> None:
    ids = np.asarray(tokens, np.int64)
    if embeds is None:
        h.update(ids.tobytes())
        return
    named = ids >= EMBED_ID_BASE
    h.update(np.where(named, EMBED_ID_BASE, ids).tobytes())
    for row in ids[named] - EMBED_ID_BASE:
        h.update(embeds[int(row)].float().numpy().tobytes())


# What every answer's outcome feeds (the canary's metrics and guard rails): version, outcome, ms.
ServedFeed = Callable[[str, ServedOutcome, float], None]


@dataclass(frozen=True)
class LLMRequest:
    """What the LLM stage needs of its request."""

    model: LoadedModel
    user_id: str
    view: UserHistoryView
    candidates: np.ndarray  # dense ids
    deadline: float  # a time.perf_counter() instant


@dataclass(frozen=True)
class LLMStage:
    """What the LLM stage gave one request: a P(Yes) per candidate (NaN: none), where each came
    from, why candidates went without, and its steps' milliseconds in the order they ran."""

    scores: np.ndarray
    sources: tuple[CandidateSource, ...]
    reasons: tuple[DegradedReason, ...] = ()
    timings_ms: dict[Stage, float] = field(default_factory=dict)
    prototype: str | None = None  # the prototype adapter the scores came from (None: the user's own)

    @classmethod
    def none(cls, n: int) -> "LLMStage":
        """No LLM stage: the version answers with its CRM."""
        return cls(np.full(n, np.nan), (CandidateSource.NONE,) * n)


@dataclass(frozen=True)
class PendingScores:
    """A request's LLM work that the engine may do later: the adapter and prompts, and the
    candidates' score-cache fields (None without a cache: then nothing is scored later)."""

    user_id: str
    version: str
    adapter: Adapter
    prompts: Prompts
    fields: list[str] | None


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
                 adapters: AdapterCache | None, settings: RequestSettings, scheduler: EngineScheduler | None = None,
                 score_cache: LLMScoreCache | None = None, served_log: ServedLog | None = None,
                 telemetry: Telemetry = NO_TELEMETRY, on_served: ServedFeed | None = None) -> None:
        """``settings``: the deadlines, the Redis budget, the least time an LLM stage needs, the CRM
        queue's bound and the admission rule; ``on_served`` receives every answer's outcome."""
        self.history, self.holder, self.engine = history, holder, engine
        self.adapters = adapters  # materialized user adapters, by (version, user); None: the engine mixes its own
        self.score_cache = score_cache  # LLM scores in Redis, by prompt fingerprint
        self.settings = settings
        self.telemetry = telemetry
        self.on_served = on_served or (lambda version, outcome, ms: None)
        self.served_log = served_log
        self._shadow_builders = ShadowBuilders()  # touched by the engine thread only
        # The engine runs one forward at a time; requests before background work (see EngineScheduler).
        self.scheduler = scheduler or (EngineScheduler() if engine is not None else None)
        # The CRM on a thread of its own, and retrieval and prompts beside it (one worker, so the
        # prompt builder's token cache is only ever touched by one thread). Both compute on their
        # own thread alone (``on_one_thread``): only the engine's thread runs intra-op threads.
        self._crm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm", initializer=on_one_thread)
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text", initializer=on_one_thread)
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
        deadline = start + (deadline_ms or self.settings.default_deadline_ms) / 1000.0
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
            self.on_served(snapshot.version, ServedOutcome.ERROR, (time.perf_counter() - start) * 1000.0)
            raise
        self.on_served(result.model_version, ServedOutcome.DEGRADED if result.degraded else ServedOutcome.OK,
                       result.timings_ms[Stage.TOTAL])
        if self.served_log is not None:
            at_ms = int(time.time() * 1000)
            self.served_log.offer([ServedScore(request_id, user_id, c.item_id, result.model_version, c.score,
                                               c.llm_score, c.crm_score, at_ms) for c in result.candidates])
            if shadow is not None:
                self._shadow(shadow, request_id, user_id, candidates, stored)
        return result

    async def _score(self, snapshot: ModelSnapshot, user_id: str, candidates: Sequence[int], start: float,
                     deadline: float) -> tuple[ScoreResult, StoredHistory]:
        """One version's answer, and the history it read (for a shadow to score the same): the
        scoring sequence's steps (``service.scoring.sequence``) with the deadline, the score
        cache and the fallbacks between them."""
        model, builder = snapshot.model, snapshot.builder
        unknown = model.catalog.unknown(candidates)
        if unknown:
            raise UnknownItems(unknown, model.version)
        limit = self.settings.cpu_queue_limit
        if self._cpu_queued >= limit:
            raise Overloaded(f"{self._cpu_queued} requests wait for the CRM; at most {limit}")
        self.loop_lag.ensure_running()
        t = time.perf_counter()
        stored, history_reason = await self._read_history(user_id)
        timings: dict[Stage, float] = {Stage.HISTORY: (time.perf_counter() - t) * 1000.0}
        view = UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile,
                                        self._knowledge(model, stored.knowledge, stored.knowledge_error))
        dense = model.catalog.to_dense(candidates)
        loop = asyncio.get_running_loop()
        made_by = answer_source(model, self.engine, builder)  # CRM alone: no prompt, adapter, forward or job
        text = (loop.run_in_executor(self._text_pool, text_inputs, builder, model, view, dense)
                if made_by is not ScoreSource.CRM else None)
        self._cpu_queued += 1
        try:
            crm, timings[Stage.CRM] = await loop.run_in_executor(self._crm_pool, _timed, run_crm, model, view, dense)
        except BaseException:
            if text is not None:
                text.cancel()
            raise
        finally:
            self._cpu_queued -= 1
        llm = (await self._llm_stage(LLMRequest(model, user_id, view, dense, deadline), text, crm.user_rep)
               if text is not None else LLMStage.none(len(dense)))
        timings.update(llm.timings_ms)
        scored = Scored.of(model, made_by, dense, crm.scores, llm.scores)
        reasons = [*history_reason, *llm.reasons]
        if scored.has_llm.any() and not scored.has_llm.all():
            reasons.append(DegradedReason.LLM_PARTIAL)
        timings[Stage.TOTAL] = (time.perf_counter() - start) * 1000.0
        self._report(timings, reasons, llm.sources)
        return ScoreResult(
            user_id=user_id, model_version=model.version,
            candidates=[CandidateResult(int(c), float(s), None if np.isnan(l) else float(l), float(k))
                        for c, s, l, k in zip(candidates, scored.final, scored.llm, scored.crm)],
            degraded=bool(reasons), degraded_reasons=reasons, cold_start=not stored.exists, score_source=made_by,
            timings_ms=timings, adapter=llm.prototype if scored.has_llm.any() else None), \
            StoredHistory(stored.items, stored.ratings, stored.profile, stored.knowledge)

    async def _read_history(self, user_id: str) -> tuple[UserHistory, tuple[DegradedReason, ...]]:
        """The user's stored history within the Redis budget; an empty one (cold start) and why
        when Redis fails or is slow."""
        # The budget is Redis's: time the event loop is late running callbacks is not held against it.
        return await read_history(self.history, user_id, (self.settings.history_budget_ms + self.loop_lag.ms) / 1000.0)

    def _report(self, timings: dict[Stage, float], reasons: Sequence[DegradedReason],
                sources: Sequence[CandidateSource]) -> None:
        """One answer's stage times (in the order they ran), degrade reasons and candidate sources."""
        for stage, ms in timings.items():
            self.telemetry.measure(stage, ms)
        for reason in reasons:
            self.telemetry.count(reason)
        for source in CandidateSource:
            n = sum(s is source for s in sources)
            if n:
                self.telemetry.count(source, n)

    def _knowledge(self, model: LoadedModel, record: KnowledgeRecord | None, error: str | None) -> np.ndarray | None:
        """The user's stored knowledge vector when ``model`` reads it, else None (the CRM's default)."""
        served = serve_knowledge(model, record, error)
        if served.outcome is not None:
            if error:
                burst.log(logging.WARNING, "knowledge-record", "malformed knowledge record, serving the default",
                          error=error)
            self.telemetry.count(served.outcome)
            if served.age_s is not None:
                self.telemetry.measure(Quantity.KNOWLEDGE_AGE_S, served.age_s)
        return served.vector

    def _shadow(self, snapshot: ModelSnapshot, request_id: str, user_id: str, candidates: Sequence[int],
                stored: StoredHistory) -> None:
        """Score the request with the shadow candidate when the engine is free; record, never serve."""
        if self.scheduler is None:
            self.telemetry.count(ShadowOutcome.NOT_QUEUED)
            return
        loop, engine, adapters, builders = asyncio.get_running_loop(), self.engine, self.adapters, self._shadow_builders
        request_id = request_id or uuid.uuid4().hex
        items = list(candidates)

        def work(interrupted):
            scored = shadow_score(snapshot, builders.of(snapshot), engine, adapters, user_id, stored, items, interrupted)
            if scored is None:
                loop.call_soon_threadsafe(self.telemetry.count, ShadowOutcome.UNSCORABLE)
                return
            loop.call_soon_threadsafe(self._record_shadow, request_id, user_id, snapshot.version, items, scored)

        queued = self.scheduler.submit_background(("shadow", snapshot.version, request_id), work, 0.0)
        self.telemetry.count(ShadowOutcome.QUEUED if queued else ShadowOutcome.NOT_QUEUED)

    def _record_shadow(self, request_id: str, user_id: str, version: str, candidates: list[int],
                       scored: Scored) -> None:
        at_ms = int(time.time() * 1000)
        self.served_log.offer([ServedScore(request_id, user_id, int(c), version, float(s),
                                           None if np.isnan(l) else float(l), float(k), at_ms, shadow=True)
                               for c, s, l, k in zip(candidates, scored.final, scored.llm, scored.crm)])

    async def _llm_stage(self, request: LLMRequest, text: asyncio.Future[Prompts], user_rep) -> LLMStage:
        """What the score cache and the engine can give in time: cached scores, then the misses
        live when the engine's queue and this forward fit the time left, else none now and a
        background job that scores them into the cache. A failure keeps what the cache gave."""
        model, user_id, view, deadline = request.model, request.user_id, request.view, request.deadline
        count = len(request.candidates)
        timings: dict[Stage, float] = {}
        scores = np.full(count, np.nan)
        sources = [CandidateSource.NONE] * count
        pending: PendingScores | None = None
        misses: list[int] = []
        try:
            prompts = await text
            timings[Stage.RETRIEVAL], timings[Stage.PROMPTS] = prompts.retrieval_ms, prompts.prompts_ms
            t = time.perf_counter()
            adapter = user_adapter(model, user_id, user_rep, self.adapters, self.engine)
            prompts = with_collab_embeds(model, prompts, user_rep, request.candidates)
            timings[Stage.ADAPTER], t = since(t)
            fields = (prompt_fingerprints(adapter, view, prompts.prefix, prompts.suffixes, prompts.embeds)
                      if self.score_cache is not None else None)
            pending = PendingScores(user_id, model.version, adapter, prompts, fields)
            if fields is not None:
                scores = await self._cached_scores(user_id, model.version, fields)
                sources = [CandidateSource.NONE if np.isnan(s) else CandidateSource.CACHED for s in scores]
                timings[Stage.LLM_CACHE], t = since(t)
            misses = [i for i in range(count) if np.isnan(scores[i])]
            if not misses:
                self.telemetry.count(Admission.CACHED)
                return LLMStage(scores, tuple(sources), (), timings, adapter.prototype)
            miss_suffixes = [prompts.suffixes[i] for i in misses]
            remaining_ms = (deadline - time.perf_counter()) * 1000.0
            expected = self.engine.expected_ms(prompts.prefix, miss_suffixes)
            backlog = self.scheduler.backlog_ms() if self.settings.queue_aware else 0.0
            skip = llm_admission(remaining_ms, expected, self.settings.llm_min_ms, backlog)
            if skip is not None:
                self.telemetry.count(ADMISSION_OF[skip])
                self._score_later(pending, misses, expected)
                return LLMStage(scores, tuple(sources), (skip,), timings, adapter.prototype)
            self.telemetry.count(Admission.LIVE)
            call = EngineCall(adapter, prompts.prefix, miss_suffixes, deadline, prompts.embeds)
            future = self.scheduler.submit_call(self.engine, call,
                                                expected if expected is not None else remaining_ms)
            scored = await asyncio.wait_for(asyncio.wrap_future(future), max(remaining_ms, 0.0) / 1000.0)
            scores[misses] = scored
            for i in misses:
                sources[i] = CandidateSource.LIVE
            timings[Stage.LLM], _ = since(t)
            if pending.fields is not None:
                self._cache_scores(user_id, model.version, {pending.fields[i]: float(s) for i, s in zip(misses, scored)})
            return LLMStage(scores, tuple(sources), (), timings, adapter.prototype)
        except (asyncio.TimeoutError, TimeoutError):  # waited too long, or the engine gave up
            if pending is not None and misses:
                self._score_later(pending, misses, None)
            return LLMStage(scores, tuple(sources), (DegradedReason.LLM_TIMEOUT,), timings,
                            pending.adapter.prototype if pending is not None else None)
        except Exception as exc:  # the LLM stage must never turn an answer into a 5xx
            burst.log(logging.ERROR, f"llm:{type(exc).__name__}", f"LLM stage failed, answering with CRM scores: "
                      f"{type(exc).__name__}: {exc}", exc_info=True)
            return LLMStage(scores, tuple(sources), (DegradedReason.LLM_ERROR,), timings)

    async def _cached_scores(self, user_id: str, version: str, fields: list[str]) -> np.ndarray:
        """Cached LLM scores (NaN: a miss) within the cache's budget; a slow or failing Redis is
        all misses."""
        try:
            cached = await asyncio.wait_for(self.score_cache.get(user_id, version, fields),
                                            (self.score_cache.settings.llm_score_cache_budget_ms + self.loop_lag.ms) / 1000.0)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            burst.log(logging.WARNING, "score-cache", "LLM score cache unavailable, scoring without it",
                      error=repr(exc))
            self.telemetry.count(ScoreCacheOutcome.ERROR, len(fields))
            return np.full(len(fields), np.nan)
        hits = sum(v is not None for v in cached)
        self.telemetry.count(ScoreCacheOutcome.HIT, hits)
        self.telemetry.count(ScoreCacheOutcome.MISS, len(fields) - hits)
        return np.asarray([np.nan if v is None else v for v in cached], np.float64)

    def _cache_scores(self, user_id: str, version: str, scores: dict[str, float]) -> None:
        """Write LLM scores to the score cache off the request path: a slow or failed write delays
        nothing."""
        task = asyncio.get_running_loop().create_task(self._write_scores(user_id, version, scores))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_scores(self, user_id: str, version: str, scores: dict[str, float]) -> None:
        try:
            await self.score_cache.put(user_id, version, scores)
        except (RedisError, OSError) as exc:
            burst.log(logging.WARNING, "score-cache-write", "LLM score cache write failed", error=repr(exc))
            self.telemetry.count(ScoreCacheOutcome.WRITE_ERROR, len(scores))

    def _score_later(self, pending: PendingScores, misses: list[int], expected_ms: float | None) -> None:
        """Queue the candidates without an LLM score for background scoring into the score cache,
        so the user's next request finds them; nothing without a cache to put them in."""
        if pending.fields is None or self.scheduler is None:
            return
        miss_fields = [pending.fields[i] for i in misses]
        miss_suffixes = [pending.prompts.suffixes[i] for i in misses]
        loop = asyncio.get_running_loop()

        def cache(scored: np.ndarray) -> None:
            scores = {field: float(s) for field, s in zip(miss_fields, scored)}
            loop.call_soon_threadsafe(self._cache_scores, pending.user_id, pending.version, scores)

        key = (pending.user_id, pending.version,
               hashlib.blake2b("".join(miss_fields).encode(), digest_size=16).hexdigest())
        call = EngineCall(pending.adapter, pending.prompts.prefix, miss_suffixes, embeds=pending.prompts.embeds)
        self.scheduler.submit_background_call(key, self.engine, call, cache, expected_ms or 0.0)


def on_one_thread() -> None:
    """A CPU worker beside the engine computes on its own thread alone, in torch and in faiss.

    An OpenMP runtime keeps a team of workers for every thread that ran a parallel region on
    several threads, and once libgomp manages more workers than there are CPUs its idle workers
    sleep at once instead of spinning for the next region: the engine's forwards would wait for
    their workers one way here and another in a process with one team (``docs/ENGINE.md``,
    "Threads"). The CRM's and the text side's work is small (milliseconds), and the two already
    run beside each other."""
    set_thread_intra_op_threads(1)
    search_on_one_thread()


async def read_history(history: HistoryReader, user_id: str,
                       budget_s: float) -> tuple[UserHistory, tuple[DegradedReason, ...]]:
    """The user's stored history within ``budget_s``; an empty one (cold start) and why when Redis
    fails or is slow."""
    try:
        return await asyncio.wait_for(history.read(user_id), budget_s), ()
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        burst.log(logging.WARNING, "history", "history unavailable, answering as cold start", error=repr(exc))
        return UserHistory.empty(), (DegradedReason.HISTORY_UNAVAILABLE,)


def since(t0: float) -> tuple[float, float]:
    """(milliseconds since ``t0``, now), to time consecutive steps."""
    now = time.perf_counter()
    return (now - t0) * 1000.0, now


def _timed(fn: Callable, *args):
    """``(fn(*args), milliseconds it took)``, timed on the thread that runs it."""
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1000.0
