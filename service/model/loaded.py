"""Everything a bundle version contributes to scoring, loaded and validated once.

The base LLM is not part of a version: it is loaded once per process and shared, so activating
a new version never reloads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from service.bundle import Bundle, load_bundle
from service.bundle import knowledge as knowledge_parts
from service.crm.features import FeatureSpace
from service.crm.knowledge import KnowledgeConfig
from service.crm.loading import build_crm
from service.crm.model import CRM, CRMConfig
from service.llm.collab_tokens import BUNDLE_CONFIG as COLLAB_CONFIG, BUNDLE_WEIGHTS as COLLAB_WEIGHTS
from service.llm.collab_tokens import CollabConfig, CollabProjector
from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRAConfig
from service.llm.prototypes import PrototypeSet
from service.llm.prompt import PromptConfig, PromptForm, PromptFormMismatch, check_trained_form, form_of_version
from service.model.catalog import SUPPORT_COLUMN, Catalog
from service.model.fusion import FUSION_FILE, Fusion

LORA_CONFIG, LORA_WEIGHTS = "lora/config.json", "lora/weights.safetensors"
PROMPT_CONFIG = "prompt/config.json"


@dataclass
class LoadedModel:
    version: str
    bundle: Bundle
    catalog: Catalog
    crm: CRM
    crm_config: CRMConfig
    space: FeatureSpace
    item_embeddings: torch.Tensor
    mixer: AdapterMixer | None
    lora_config: PersonalizedLoRAConfig | None
    prompt: PromptConfig
    k_text: int
    fusion: Fusion | None
    crm_item_table: torch.Tensor  # the CRM's catalog vectors; fixed per version, so built once at load
    knowledge: KnowledgeConfig | None = None  # what a knowledge CRM's user vectors must come from (encoder, dim)
    lora_prompt_form: PromptForm | None = None  # the form the LoRA was trained on (the manifest's llm component)
    prototypes: PrototypeSet | None = None  # served in place of per-user mixtures (None: exact adapters)
    collab: CollabProjector | None = None  # collaborative tokens' projector (None: the prompt has none)


def trained_prompt_form(llm_config: dict) -> PromptForm:
    """The prompt form a bundle's LoRA was trained on, as its manifest's llm component records it:
    ``prompt_form``, else the form its ``prompt_version`` names (bundles before the shared form:
    per-target)."""
    form = llm_config.get("prompt_form")
    return form if form is not None else form_of_version(str(llm_config.get("prompt_version", "")))


def load_model(bundle_dir: str | Path, *, prototypes: bool = True) -> LoadedModel:
    """Validate the bundle (schema, hashes, file kinds) and build its runtime objects; a LoRA whose
    prompt form is not the bundle's prompt config's is refused (``PromptFormMismatch``). With
    ``prototypes`` a bundle's prototype adapters serve its users (exact per-user mixtures without,
    or where the bundle has none)."""
    bundle = load_bundle(bundle_dir)
    catalog = Catalog(bundle.load_parquet_pandas("items/catalog.parquet"), bundle.load_npy("items/embeddings.npy"))
    config = CRMConfig.model_validate(bundle.load_json("crm/config.json"))
    space = FeatureSpace.model_validate(bundle.load_json("crm/features.json"))
    knowledge = vectors = None
    if knowledge_parts.COMPONENT in bundle.manifest.components:  # the reader checked its parts against the CRM
        knowledge = KnowledgeConfig.model_validate(bundle.load_json(knowledge_parts.CONFIG))
        vectors = (bundle.load_npy(knowledge_parts.ITEM_VECTORS), bundle.load_npy(knowledge_parts.USER_DEFAULT))
    crm = build_crm(config, space, catalog.items, catalog.embeddings,
                    bundle.load_safetensors("crm/weights.safetensors"), vectors).eval()
    files = {f.path for f in bundle.manifest.files}
    mixer = lora_config = None
    if LORA_CONFIG in files:
        lora_config = PersonalizedLoRAConfig.model_validate(bundle.load_json(LORA_CONFIG))
        if lora_config.gated and lora_config.user_dim != config.user_dim:
            raise ValueError(f"the gate reads {lora_config.user_dim}-d users, the CRM gives {config.user_dim}-d")
        mixer = AdapterMixer(lora_config, bundle.load_safetensors(LORA_WEIGHTS))
    prompt = PromptConfig.model_validate(bundle.load_json(PROMPT_CONFIG)) if PROMPT_CONFIG in files else PromptConfig()
    fusion = Fusion.from_json(bundle.load_json(FUSION_FILE)) if FUSION_FILE in files else None
    if fusion is not None and fusion.item_support is not None and catalog.support is None:
        raise ValueError(f"{FUSION_FILE} weighs by item support, but items/catalog.parquet has no "
                         f"{SUPPORT_COLUMN} column to read it from")
    llm = bundle.manifest.components.get("llm")
    k_text = int(llm.config.get("k_text", 10)) if llm else 10
    lora_form = trained_prompt_form(llm.config) if llm and mixer is not None else None
    if lora_form is not None:
        check_trained_form(prompt, lora_form)  # the gateway builds every prompt in the bundle's form
    with torch.no_grad():
        table = crm.item_table()
    served_prototypes = PrototypeSet.from_bundle(bundle) if prototypes and mixer is not None else None
    collab = load_collab(bundle, files, prompt, llm.config if llm else {}, config) if mixer is not None else None
    return LoadedModel(bundle.manifest.version, bundle, catalog, crm, config, space,
                       torch.from_numpy(catalog.embeddings), mixer, lora_config, prompt, k_text, fusion, table,
                       knowledge, lora_form, served_prototypes, collab)


def load_collab(bundle: Bundle, files: set[str], prompt: PromptConfig, llm_config: dict,
                crm_config: CRMConfig) -> CollabProjector | None:
    """The collaborative tokens' projector where the LoRA was trained with them: the manifest's llm
    component, the prompt config and the files must agree (a prompt without the tokens would
    read other inputs than the LoRA learned on), and the projector must read this CRM's sizes."""
    recorded = bool(llm_config.get("collab_tokens", False))
    present = COLLAB_CONFIG in files
    if not (recorded == prompt.collab_tokens == present):
        raise PromptFormMismatch(
            f"collaborative tokens: the LoRA {'was' if recorded else 'was not'} trained with them, the prompt config "
            f"{'has' if prompt.collab_tokens else 'has no'} them and the bundle {'holds' if present else 'holds no'} "
            f"{COLLAB_CONFIG}: export the bundle from the LoRA's own training run")
    if not present:
        return None
    cfg = CollabConfig.model_validate(bundle.load_json(COLLAB_CONFIG))
    if (cfg.user_dim, cfg.item_dim) != (crm_config.user_dim, crm_config.emb_dim):
        raise ValueError(f"the collaborative tokens read {cfg.user_dim}-d users and {cfg.item_dim}-d items, the CRM "
                         f"gives {crm_config.user_dim}-d and {crm_config.emb_dim}-d")
    return CollabProjector.from_state(cfg, bundle.load_safetensors(COLLAB_WEIGHTS))
