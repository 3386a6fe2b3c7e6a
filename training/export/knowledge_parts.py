"""The knowledge parts of a bundle whose CRM reads LLM knowledge (``service.bundle.knowledge``).

Only what serving needs travels: the item vectors and the default user vector the CRM reads, and
what produced them (encoder, prompts, generator), so the service can check a stored user vector
against the encoder and dim and write a new user's text the same way. Users' vectors live in
Redis, not in the bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.bundle import BundleError
from service.bundle.knowledge import COMPONENT, CONFIG, ITEM_VECTORS, USER_DEFAULT
from service.bundle.writer import BundleWriter
from training.crm.checkpoint import KNOWLEDGE_FILES

KIND = "kar-hybrid-expert"
CONFIG_KEYS = ("encoder", "dim", "cutoff_timestamp", "max_new_tokens", "prompts", "generator")


def add_knowledge_parts(writer: BundleWriter, crm_dir: Path, crm_config: dict) -> None:
    """Add knowledge/* and the ``knowledge`` component when the CRM in ``crm_dir`` reads knowledge."""
    dim = crm_config.get("knowledge_dim", 0)
    if not dim:
        return
    missing = [rel for rel in (KNOWLEDGE_FILES["item_vectors"], KNOWLEDGE_FILES["user_default"],
                               KNOWLEDGE_FILES["config"]) if not (crm_dir / rel).is_file()]
    if missing:
        raise BundleError(f"the CRM in {crm_dir} reads knowledge but its checkpoint lacks {', '.join(missing)}")
    meta = json.loads((crm_dir / KNOWLEDGE_FILES["config"]).read_text())
    config = {key: meta[key] for key in CONFIG_KEYS if key in meta}
    writer.add_file(ITEM_VECTORS, crm_dir / KNOWLEDGE_FILES["item_vectors"])
    writer.add_file(USER_DEFAULT, crm_dir / KNOWLEDGE_FILES["user_default"])
    writer.add_json(CONFIG, config)
    writer.set_component(COMPONENT, kind=KIND, config={
        "encoder": config.get("encoder"), "dim": dim, "cutoff_timestamp": config.get("cutoff_timestamp"),
        **{key: crm_config[key] for key in ("knowledge_experts_shared", "knowledge_experts_per_type",
                                            "knowledge_hidden", "knowledge_out") if key in crm_config}})
