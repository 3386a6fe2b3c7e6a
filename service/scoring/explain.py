"""One request's scores taken apart (``POST /v1/explain``): the CRM's, the LLM's P(Yes), the
fusion and what is served, the history behaviours each prompt read, the user's gate mixture and
the prompts' sizes.

The LLM part is computed on demand, also for a version that serves its CRM alone (``serve:
crm``), so a user can see what the LLM would have said. It runs the scoring sequence's steps
(``service.scoring.stages``: CRM, retrieval and prompts, the user's adapter) on the version the
user's ``/v1/score`` requests are routed to, and its forward goes through the engine scheduler as a
request-priority call with the explanation's own deadline: it waits in the same queue as score
requests, never beside it, and is admitted by the same rule (``llm_admission``). It writes nothing
that scoring reads: no score-cache entry, no served-score log entry, no adapter-cache entry, no
background job, no change to the active model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.config import ExplainSettings, RequestSettings
from service.engine.base import Adapter, EngineCall, ScoringEngine
from service.history import HistoryReader
from service.llm.gate_mixture import gate_mixture
from service.llm.prompt import PromptBuilder
from service.model import LoadedModel, ModelHolder
from service.model.fusion import ScoreSource
from service.scoring.contracts import (AdapterExplanation, CandidateExplanation, DegradedReason, Explanation,
                                       LLMUnavailable, Overloaded, ReadBehaviour, UnknownItems)
from service.scoring.engine_scheduler import EngineScheduler
from service.scoring.pipeline import llm_admission, on_one_thread, read_history, since
from service.scoring.sequence import Scored
from service.scoring.stages import (CRMResult, Prompts, UserHistoryView, answer_source, fuse, run_crm, text_inputs,
                                    user_adapter, with_collab_embeds)
from service.scoring.user_knowledge import serve_knowledge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Prepared:
    """What the CPU side computed before the forward."""

    crm: CRMResult
    prompts: Prompts | None
    adapter: Adapter | None
    adapter_explained: AdapterExplanation | None
    timings_ms: dict[str, float]


class ScoreExplainer:
    """The ``Explainer`` of the service, over the scoring pipeline's history store, model holder,
    engine and engine scheduler."""

    def __init__(self, *, history: HistoryReader, holder: ModelHolder, engine: ScoringEngine | None,
                 scheduler: EngineScheduler | None, requests: RequestSettings, settings: ExplainSettings) -> None:
        self.history, self.holder, self.engine, self.scheduler = history, holder, engine, scheduler
        self.requests, self.settings = requests, settings
        self._inflight = 0  # event loop only
        # One worker: CRM, retrieval and prompts of explanations, beside the pipeline's own workers.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain", initializer=on_one_thread)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def explain(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None) -> Explanation:
        if self._inflight >= self.settings.explain_max_inflight:
            raise Overloaded(f"{self._inflight} explain requests in flight; "
                             f"at most {self.settings.explain_max_inflight}")
        self._inflight += 1
        try:
            return await self._explain(user_id, list(candidates), deadline_ms or self.settings.explain_deadline_ms)
        finally:
            self._inflight -= 1

    async def _explain(self, user_id: str, candidates: list[int], deadline_ms: int) -> Explanation:
        start = time.perf_counter()
        deadline = start + deadline_ms / 1000.0
        snapshot, _ = self.holder.snapshot().route(user_id)  # the version the user's scores come from
        model, builder = snapshot.model, snapshot.builder
        unknown = model.catalog.unknown(candidates)
        if unknown:
            raise UnknownItems(unknown, model.version)
        stored, unavailable = await read_history(self.history, user_id, self.requests.history_budget_ms / 1000.0)
        reasons = list(unavailable)
        timings = {"history": (time.perf_counter() - start) * 1000.0}
        view = UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile,
                                        serve_knowledge(model, stored.knowledge, stored.knowledge_error).vector)
        dense = model.catalog.to_dense(candidates)
        has_llm = model.mixer is not None and self.engine is not None and builder is not None
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._pool, self._prepare, model, builder, user_id, view, dense, has_llm)
        timings.update(prepared.timings_ms)
        llm, why = None, None
        if prepared.prompts is None:
            why = LLMUnavailable.NO_LLM if model.mixer is None else LLMUnavailable.NO_ENGINE
        else:
            t = time.perf_counter()
            llm, why = await self._forward(prepared.adapter, prepared.prompts, deadline)
            timings["llm"] = (time.perf_counter() - t) * 1000.0
        if why is not None and not isinstance(why, LLMUnavailable):
            reasons.append(why)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        source = answer_source(model, self.engine, builder)
        return Explanation(
            user_id=user_id, model_version=model.version, score_source=source, cold_start=not stored.exists,
            history_length=len(view.items), prompt_form=builder.config.form if builder is not None else None,
            prefix_tokens=len(prepared.prompts.prefix) if prepared.prompts is not None else None,
            candidates=self._candidates(model, view, candidates, dense, prepared, llm, source),
            adapter=prepared.adapter_explained, llm_computed=llm is not None, llm_reason=why,
            deadline_ms=float(deadline_ms), degraded_reasons=reasons,
            timings_ms={k: round(v, 3) for k, v in timings.items()})

    def _prepare(self, model: LoadedModel, builder: PromptBuilder | None, user_id: str, view: UserHistoryView,
                 dense: np.ndarray, has_llm: bool) -> _Prepared:
        """CRM, then (where the gateway can run the version's LLM) retrieval and prompts and the
        user's adapter, as ``score_sequence`` makes them; no adapter cache is read or written."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        crm = run_crm(model, view, dense)
        timings["crm"], t = since(t)
        if model.mixer is None:
            return _Prepared(crm, None, None, None, timings)
        explained = explain_adapter(model, crm, self.settings.explain_top_meta)
        if not has_llm:
            return _Prepared(crm, None, None, explained, timings)
        prompts = with_collab_embeds(model, text_inputs(builder, model, view, dense), crm.user_rep, dense)
        timings["retrieval"], timings["prompts"] = prompts.retrieval_ms, prompts.prompts_ms
        t = time.perf_counter()
        adapter = user_adapter(model, user_id, crm.user_rep, None, self.engine)
        timings["adapter"], _ = since(t)
        return _Prepared(crm, prompts, adapter, explained, timings)

    async def _forward(self, adapter: Adapter, prompts: Prompts,
                       deadline: float) -> tuple[np.ndarray | None, DegradedReason | None]:
        """P(Yes) per candidate from the engine, as a request-priority call with ``deadline``, or
        why there is none: admitted by the score requests' rule, abandoned at the deadline."""
        remaining_ms = (deadline - time.perf_counter()) * 1000.0
        expected = self.engine.expected_ms(prompts.prefix, prompts.suffixes)
        skip = llm_admission(remaining_ms, expected, self.requests.llm_min_ms,
                             self.scheduler.backlog_ms() if self.requests.queue_aware else 0.0)
        if skip is not None:
            return None, skip
        call = EngineCall(adapter, prompts.prefix, prompts.suffixes, deadline, prompts.embeds)
        future = self.scheduler.submit_call(self.engine, call, expected if expected is not None else remaining_ms)
        try:
            scores = await asyncio.wait_for(asyncio.wrap_future(future), max(remaining_ms, 0.0) / 1000.0)
        except (asyncio.TimeoutError, TimeoutError):
            return None, DegradedReason.LLM_TIMEOUT
        except Exception as exc:  # an explanation reports the failure, like a degraded answer
            log.error("explain: LLM forward failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            return None, DegradedReason.LLM_ERROR
        return np.asarray(scores, np.float64), None

    @staticmethod
    def _candidates(model: LoadedModel, view: UserHistoryView, raw: list[int], dense: np.ndarray,
                    prepared: _Prepared, llm: np.ndarray | None, source: ScoreSource) -> list[CandidateExplanation]:
        crm = prepared.crm.scores
        llm_scores = np.full(len(dense), np.nan) if llm is None else llm
        # What /v1/score serves when its LLM stage scores every candidate: the one fusion rule.
        served = Scored.of(model, source, dense, crm, llm_scores if source is not ScoreSource.CRM else None).final
        fused = fuse(model, crm, llm_scores, dense) if model.fusion is not None and llm is not None else None
        prompts = prepared.prompts
        out = []
        for i, (item, d) in enumerate(zip(raw, dense)):
            read = read_behaviours(model, view, int(d), prompts.read[i]) if prompts is not None else ()
            out.append(CandidateExplanation(
                item_id=int(item), title=model.catalog.texts[int(d)].render(), crm_score=float(crm[i]),
                llm_score=None if llm is None else float(llm[i]),
                fused_score=None if fused is None else float(fused[i]), served_score=float(served[i]),
                prompt_tokens=len(prompts.prefix) + len(prompts.suffixes[i]) if prompts is not None else None,
                history=read))
        return out


def read_behaviours(model: LoadedModel, view: UserHistoryView, candidate: int,
                    positions: np.ndarray) -> tuple[ReadBehaviour, ...]:
    """The behaviours at ``positions`` (time order, as the prompt lists them), each with its
    similarity to the candidate and its rank by it (1 = most similar)."""
    embeddings = model.catalog.embeddings
    items = view.items[np.asarray(positions, np.int64)]
    similarity = embeddings[items] @ embeddings[candidate]
    ranks = np.empty(len(items), np.int64)
    ranks[np.lexsort((np.arange(len(items)), -similarity))] = np.arange(1, len(items) + 1)
    return tuple(ReadBehaviour(item_id=model.catalog.to_raw(int(item)), title=model.catalog.texts[int(item)].render(),
                               rating=float(view.ratings[p]), position=int(p), rank=int(r), similarity=float(s))
                 for item, p, r, s in zip(items, positions, ranks, similarity))


def explain_adapter(model: LoadedModel, crm: CRMResult, top_k: int) -> AdapterExplanation:
    """The user's gate mixture (the top ``top_k`` meta-LoRAs per layer group and averaged), or that
    the version has one shared LoRA; where it serves prototypes, the user's one and its mixture."""
    mixer = model.mixer
    if not mixer.cfg.gated:
        return AdapterExplanation(kind="single_lora")
    alphas = mixer.mixtures(crm.user_rep)
    mixture = gate_mixture(mixer.module_names, alphas.numpy(), top_k)
    prototype = prototype_mixture = None
    if model.prototypes is not None:
        index = model.prototypes.nearest(alphas)
        prototype = model.prototypes.name(index)
        centroid = model.prototypes.centroids[index].reshape(len(mixer.module_names), -1)
        prototype_mixture = gate_mixture(mixer.module_names, centroid.numpy(), top_k)
    return AdapterExplanation(kind="meta_loras", mixture=mixture, temperature=mixer.cfg.temperature,
                              prototype=prototype, prototype_mixture=prototype_mixture)
