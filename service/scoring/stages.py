"""The CPU-bound steps of one scoring request, as plain functions of a loaded model.

Kept synchronous and free of I/O so the pipeline can time each one and run them off the event
loop; ``service.scoring.sequence`` composes them into the one scoring sequence that shadow
scoring and the registry's smoke test run whole, and the request pipeline runs with its
deadlines, score cache and fallbacks around the same steps.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from service.crm.inputs import build_inputs
from service.engine.base import Adapter, LoRABanks, ScoringEngine, UserAdapter, UserMixture
from service.llm.collab_tokens import engine_ids
from service.llm.prompt import Behaviour, PromptBuilder
from service.retrieval.history import semantic_positions, shared_positions
from service.model import LoadedModel
from service.model.fusion import ScoreSource, score_source
from service.llm.personalized_lora import AdapterMixer
from service.personalization.adapter_cache import AdapterCache


@dataclass
class UserHistoryView:
    """A user's history in dense ids, oldest first, as stored (the store caps its length).

    The CRM reads the last ``l_long`` behaviours (``build_inputs`` cuts); the text retrieval
    searches the whole stored history, as the training prompts do. A knowledge CRM also reads the
    user's knowledge vector, or its default vector where there is none."""

    items: np.ndarray  # int64 dense ids
    ratings: np.ndarray  # float32
    profile: Mapping[str, str]
    knowledge: np.ndarray | None = None  # (D,) the user's raw knowledge vector, as stored

    @classmethod
    def from_raw(cls, model: LoadedModel, raw_items: np.ndarray, ratings: np.ndarray,
                 profile: Mapping[str, str], knowledge: np.ndarray | None = None) -> "UserHistoryView":
        dense = model.catalog.to_dense(raw_items)
        keep = dense != 0  # items retired from the catalog drop out of the history
        return cls(dense[keep], np.asarray(ratings, np.float32)[keep], profile, knowledge)


def answer_source(model: LoadedModel, engine: ScoringEngine | None, builder: PromptBuilder | None) -> ScoreSource:
    """How ``model`` answers here: the CRM alone without an LLM, an engine or a prompt builder, or
    where the version's fusion says crm (then no prompt, adapter or forward is spent on the LLM)."""
    return score_source(model.fusion, model.mixer is not None and engine is not None and builder is not None)


@dataclass
class CRMResult:
    scores: np.ndarray  # (C,) P(click)
    user_rep: torch.Tensor  # (user_dim,)


@torch.inference_mode()
def run_crm(model: LoadedModel, history: UserHistoryView, candidates: np.ndarray) -> CRMResult:
    """SIM search + DIN over the long history: candidate scores and the user representation."""
    cfg = model.crm_config
    user, target = build_inputs(
        model.space, user_fields=np.asarray([model.space.encode_user(history.profile)], dtype=np.int64),
        hist_items=history.items[None, :], hist_ratings=history.ratings[None, :],
        hist_lengths=np.asarray([len(history.items)]), targets=candidates, item_embeddings=model.item_embeddings,
        l_long=cfg.l_long, l_crm=cfg.l_crm, l_recent=cfg.l_recent,
        user_knowledge=crm_user_knowledge(model, history))
    table = model.crm_item_table
    rep = model.crm.user_representation(user, table)
    logits = model.crm.score(rep, target, table)
    return CRMResult(torch.sigmoid(logits).numpy(), rep[0])


def crm_user_knowledge(model: LoadedModel, history: UserHistoryView) -> np.ndarray | None:
    """The user's vector when this version reads knowledge and it has the version's size, else
    None (the CRM's default vector): a plain CRM ignores vectors, and one of another size was
    written for another encoder."""
    if model.knowledge is None or history.knowledge is None:
        return None
    vector = np.asarray(history.knowledge, np.float32).reshape(-1)
    return vector[None, :] if len(vector) == model.knowledge.dim else None


def retrieve_text_history(model: LoadedModel, history: UserHistoryView,
                          candidates: np.ndarray) -> tuple[list[np.ndarray], list[list[Behaviour]]]:
    """Per candidate, the positions (into the history) of the K_text most similar behaviours in
    time order (one FAISS search), and those behaviours."""
    positions = semantic_positions(history.items, candidates, model.catalog.embeddings, model.k_text)
    return positions, [behaviours(model, history, pos) for pos in positions]


def retrieve_shared_history(model: LoadedModel, history: UserHistoryView,
                            candidates: np.ndarray) -> tuple[np.ndarray, list[Behaviour]]:
    """The positions of the K_text history behaviours most similar to any candidate, in time order
    (one FAISS search), and those behaviours: the shared prompt form's one history for the request."""
    positions = shared_positions(history.items, candidates, model.catalog.embeddings, model.k_text)
    return positions, behaviours(model, history, positions)


def behaviours(model: LoadedModel, history: UserHistoryView, positions: np.ndarray) -> list[Behaviour]:
    texts = model.catalog.texts
    return [Behaviour(texts[int(history.items[p])], float(history.ratings[p])) for p in positions]


def build_prompts(builder: PromptBuilder, model: LoadedModel, history: UserHistoryView, candidates: np.ndarray,
                  histories: list[list[Behaviour]]) -> tuple[list[int], list[list[int]]]:
    texts = model.catalog.texts
    return builder.encode(history.profile, histories, [texts[int(c)] for c in candidates])


@dataclass(frozen=True)
class Prompts:
    """The LLM's input for one request: a shared prefix and one suffix per candidate, the history
    positions each candidate's prompt reads (ascending; in the shared form the same for every
    candidate), and the milliseconds its two steps took (retrieval, then tokenized prompts). With
    collaborative tokens the ids name rows of ``collab_embeds`` (``EMBED_ID_BASE`` onwards)."""

    prefix: list[int]
    suffixes: list[list[int]]
    retrieval_ms: float = 0.0
    prompts_ms: float = 0.0
    read: tuple[np.ndarray, ...] = ()
    embeds: torch.Tensor | None = None  # the rows the collaborative tokens read (``with_collab_embeds``)


def text_inputs(builder: PromptBuilder, model: LoadedModel, history: UserHistoryView,
                candidates: np.ndarray) -> Prompts:
    """The LLM's inputs that need nothing from the CRM: retrieval, then the prompts, in the
    builder's form (the bundle's): per-candidate histories in the suffixes, or one history for
    the candidate set in the prefix."""
    start = time.perf_counter()
    if builder.config.form == "shared":
        positions, shared = retrieve_shared_history(model, history, candidates)
        read = (positions,) * len(candidates)
        retrieved = time.perf_counter()
        targets = [model.catalog.texts[int(c)] for c in candidates]
        prefix, suffixes = builder.encode_shared(history.profile, shared, targets)
    else:
        per_candidate, histories = retrieve_text_history(model, history, candidates)
        read = tuple(per_candidate)
        retrieved = time.perf_counter()
        prefix, suffixes = build_prompts(builder, model, history, candidates, histories)
    if builder.collab_id is not None:  # the collaborative tokens name rows of the call's embeds
        prefix, suffixes = engine_ids(prefix, suffixes, builder.collab_id)
    done = time.perf_counter()
    return Prompts(prefix, suffixes, (retrieved - start) * 1000.0, (done - retrieved) * 1000.0, read)


@torch.inference_mode()
def with_collab_embeds(model: LoadedModel, prompts: Prompts, user_rep: torch.Tensor, candidates: np.ndarray) -> Prompts:
    """``prompts`` with the rows their collaborative tokens read (``EngineCall.embeds``): the
    user's token from the CRM's user representation, then each candidate's from its CRM item
    vector; unchanged where the version's prompts have none. Needs the CRM's answer, so it runs
    after the text side and the CRM meet."""
    if model.collab is None:
        return prompts
    items = model.crm_item_table[torch.as_tensor(np.asarray(candidates, np.int64))]
    return replace(prompts, embeds=model.collab.embeds(user_rep, items))


def build_adapter(model: LoadedModel, user_id: str, alphas: torch.Tensor) -> UserAdapter:
    """Materialize one user's adapter; the key names user, version and content."""
    weights = model.mixer.adapter(alphas)
    return UserAdapter(_adapter_key(model, user_id, alphas), weights, model.lora_config.scaling, user_id=user_id)


def user_mixture(model: LoadedModel, user_id: str, alphas: torch.Tensor) -> UserMixture:
    """One user's gate weights over the version's banks, for an engine that mixes in its forward;
    the key is the materialized adapter's."""
    return UserMixture(_adapter_key(model, user_id, alphas), mixture_banks(model), alphas, user_id=user_id)


_BANKS: "weakref.WeakKeyDictionary[AdapterMixer, LoRABanks]" = weakref.WeakKeyDictionary()


def mixture_banks(model: LoadedModel) -> LoRABanks:
    """The version's meta-LoRA banks as an engine takes them, built once per loaded version."""
    mixer = model.mixer
    banks = _BANKS.get(mixer)
    if banks is None:
        banks = LoRABanks.of(f"{model.version}#{id(mixer):x}", mixer)
        _BANKS[mixer] = banks
    return banks


def _adapter_key(model: LoadedModel, user_id: str, alphas: torch.Tensor) -> str:
    digest = hashlib.sha256(alphas.float().numpy().tobytes()).hexdigest()[:12]
    return f"{user_id}@{model.version}#{digest}"


def prototype_adapter(model: LoadedModel, index: int) -> UserAdapter:
    """The version's prototype ``index`` as an adapter, named by prototype, version and weights
    (never by user): every user nearest to it shares this one adapter, loaded once per replica."""
    prototypes = model.prototypes
    return UserAdapter(_prototype_key(model, index), prototypes.weights[index], model.lora_config.scaling,
                       prototype=prototypes.name(index))


def _prototype_key(model: LoadedModel, index: int) -> str:
    prototypes = model.prototypes
    return f"{prototypes.name(index)}@{model.version}#{prototypes.digests[index]}"


def prototype_mixture(model: LoadedModel, index: int) -> UserMixture:
    """The same prototype for an engine that mixes in its forward: its centroid's gate weights
    over the banks (the prototype adapter is the mixture at the centroid), under the adapter's key."""
    prototypes = model.prototypes
    alphas = prototypes.centroids[index].reshape(len(model.mixer.module_names), -1)
    return UserMixture(_prototype_key(model, index), mixture_banks(model), alphas, prototype=prototypes.name(index))


def prototype_adapters(model: LoadedModel) -> list[UserAdapter]:
    """Every prototype adapter of the version (none when it serves exact adapters): what a remote
    engine loads on every replica before the version serves."""
    return [prototype_adapter(model, i) for i in range(len(model.prototypes))] if model.prototypes else []


def user_adapter(model: LoadedModel, user_id: str, user_rep: torch.Tensor, adapters: AdapterCache | None,
                 engine: ScoringEngine | None = None) -> Adapter:
    """The user's adapter for ``engine``: where the version serves prototypes, the one nearest to the
    user's gate outputs (nothing to build); else the user's own mixture of the meta-LoRAs. An engine
    that mixes in its forward (``mixes_in_forward``) takes the gate weights over the version's banks,
    nothing built or cached; others take the materialized mixture, from the adapter cache while the
    mixture has not drifted (built afresh without a cache)."""
    alphas = model.mixer.mixtures(user_rep)
    in_forward = getattr(engine, "mixes_in_forward", False)
    if model.prototypes is not None:
        index = model.prototypes.nearest(alphas)
        return prototype_mixture(model, index) if in_forward else prototype_adapter(model, index)
    if in_forward:
        return user_mixture(model, user_id, alphas)
    if adapters is None:
        return build_adapter(model, user_id, alphas)
    adapter, _ = adapters.get_or_build(user_id, model.version, alphas, lambda a: build_adapter(model, user_id, a))
    return adapter


def fuse(model: LoadedModel, crm: np.ndarray, llm: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The served score per candidate (dense ``items``): the version's fusion of LLM and CRM where the
    candidate has an LLM score (the LLM's own without a fusion), the CRM's where it has none (NaN).
    A fusion weighing by item support reads each candidate's from the catalog."""
    crm = np.asarray(crm)
    final = crm.astype(np.float64)
    has = ~np.isnan(llm)
    if has.any():
        if model.fusion is None:
            final[has] = llm[has]
        else:
            support = None if model.catalog.support is None else model.catalog.support[np.asarray(items)[has]]
            final[has] = model.fusion(llm[has], crm[has], support)
    return final
