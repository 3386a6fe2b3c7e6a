"""A model bundle version loaded for serving: catalog, CRM, LoRA banks, prompt config, fusion.

Below the scoring pipeline and the registry, above the model code (``crm``, ``llm``, ``bundle``):
training imports ``Fusion`` from here too, so the bundle's contract is defined once.
"""

from service.model.catalog import Catalog
from service.model.fusion import FUSION_FILE, Fusion
from service.model.holder import ModelHolder, ModelSnapshot
from service.model.loaded import LoadedModel, load_model

__all__ = ["FUSION_FILE", "Catalog", "Fusion", "LoadedModel", "ModelHolder", "ModelSnapshot", "load_model"]
