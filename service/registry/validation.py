"""Everything a candidate version must pass before it may be activated.

In order: the bundle reader (manifest schema, sizes, hashes, file kinds: safetensors/JSON/NPY/
parquet only, pickle refused; prototype parts: count and shapes), the runtime loader (CRM weights
strictly against the CRM config, meta-LoRA banks against the LoRA config), the LoRA against the
base model the service runs (module names, shapes, floating dtypes, rank within the serving
limit), the prototypes (no more than the serving limit, each the LoRA mixed at its centroid),
the prompt's form against the one the LoRA was trained on (the loader refuses another), the
prompt's answer tokens against the engine's, then a smoke test: a few golden requests scored
end to end with the candidate, refused on NaN, infinities or probabilities outside [0, 1]. Each
refusal carries a ``reason`` (a bounded metrics label) and a message that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from service.bundle import BundleError
from service.engine.base import ScoringEngine
from service.llm.prompt import PromptBuilder, PromptFormMismatch
from service.registry.errors import RefusalReason, ValidationFailed
from service.model import LoadedModel, load_model
from service.scoring.sequence import Scored, score_sequence
from service.scoring.stages import UserHistoryView

SMOKE_CANDIDATES = 5
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})  # safetensors header names


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base model's target-able Linear layers and the label tokens."""

    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    yes_id: int | None = None
    no_id: int | None = None

    @classmethod
    def from_pretrained_config(cls, base_model_dir: Path, *, yes_id: int | None = None,
                               no_id: int | None = None) -> "BaseModelSpec":
        """Shapes read off the architecture built on the meta device: no weights are loaded."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_model_dir, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        return cls(shapes, yes_id, no_id)


@dataclass
class ValidationReport:
    version: str
    checks: list[str] = field(default_factory=list)
    smoke_scores: list[list[float]] = field(default_factory=list)  # served scores per golden request


def load_candidate(bundle_dir: Path, *, prototypes: bool = True) -> LoadedModel:
    """The runtime objects of a candidate, or ValidationFailed saying why it cannot load."""
    try:
        return load_model(bundle_dir, prototypes=prototypes)
    except BundleError as exc:
        raise ValidationFailed(RefusalReason.BUNDLE, str(exc)) from None
    except PromptFormMismatch as exc:
        raise ValidationFailed(RefusalReason.PROMPT_MISMATCH, str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"{exc.title}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"{type(exc).__name__}: {_short(str(exc))}") from None


def check_lora(model: LoadedModel, spec: BaseModelSpec, max_rank: int) -> list[str]:
    """The meta-LoRA banks fit the base model: every target module present, shapes, dtypes, rank."""
    if model.mixer is None:
        return ["no LoRA in this version (CRM only)"]
    cfg = model.lora_config
    if cfg.r > max_rank:
        raise ValidationFailed(RefusalReason.RANK_LIMIT, f"LoRA rank {cfg.r} exceeds the serving limit of {max_rank}")
    expected = {n for n in spec.linear_shapes if n.rsplit(".", 1)[-1] in cfg.target_modules}
    names = set(model.mixer.module_names)
    if not expected:
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"the base model has no Linear layers named {cfg.target_modules}")
    if names != expected:
        missing, unknown = sorted(expected - names), sorted(names - expected)
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, "LoRA modules do not match the base model: "
                               f"missing {missing[:3]}, not in the base model {unknown[:3]}")
    for name, a, b in zip(model.mixer.module_names, model.mixer.banks_a, model.mixer.banks_b):
        d_in, d_out = spec.linear_shapes[name]
        want_a, want_b = (cfg.n_meta, d_in, cfg.r), (cfg.n_meta, cfg.r, d_out)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"{name}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                                   f"the base model needs {want_a} / {want_b}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"{name}: LoRA weights contain NaN or infinity")
    return [f"LoRA: {len(names)} modules, rank {cfg.r} (limit {max_rank}), {cfg.n_meta} meta-LoRAs"]


def check_prototypes(model: LoadedModel, max_prototypes: int | None = None, atol: float = 1e-5) -> list[str]:
    """No more prototypes than the servers keep loaded, and each prototype adapter the meta-LoRAs
    mixed at its centroid, so a user at the centroid gets exactly the adapter the exact mode would
    give; a prototype that is anything else (other weights, another LoRA's) is refused."""
    prototypes = model.prototypes
    if prototypes is None:
        return []
    if max_prototypes is not None and len(prototypes) > max_prototypes:
        raise ValidationFailed(RefusalReason.PROTOTYPE_LIMIT, f"{len(prototypes)} prototype adapters exceed the "
                               f"serving limit of {max_prototypes}")
    n_modules = len(model.mixer.module_names)
    for i, (centroid, stored) in enumerate(zip(prototypes.centroids, prototypes.weights)):
        mixed = model.mixer.adapter(centroid.reshape(n_modules, -1))
        for name, (a, b) in mixed.items():
            a_p, b_p = stored[name]
            if not (torch.allclose(a_p, a, atol=atol, rtol=1e-4) and torch.allclose(b_p, b, atol=atol, rtol=1e-4)):
                raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"prototype {prototypes.name(i)}: {name} is not "
                                       "the LoRA's mixture at its centroid")
    return [f"prototypes: {len(prototypes)} adapters, each the mixture at its centroid"]


def check_weight_dtypes(model: LoadedModel) -> list[str]:
    """Stored tensors are floating point where the runtime computes with them (read from the
    safetensors headers: the loader has already read the data, and converts it)."""
    from safetensors import safe_open

    for rel in ("crm/weights.safetensors", "lora/weights.safetensors"):
        if model.bundle.manifest.entry(rel) is None:
            continue
        with safe_open(model.bundle.path(rel), framework="pt") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                if dtype not in FLOAT_DTYPES and not name.endswith("num_batches_tracked"):
                    raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"{rel}: tensor {name!r} has dtype {dtype}; "
                                           "weights must be floating point")
    return ["weights: floating dtypes"]


def golden_requests(model: LoadedModel) -> list[tuple[UserHistoryView, np.ndarray]]:
    """A cold-start user and two users with histories from the candidate's own catalog."""
    dense = np.sort(model.catalog.items["item_idx"].to_numpy(np.int64))
    candidates = dense[-SMOKE_CANDIDATES:]
    pool = dense[:-SMOKE_CANDIDATES] if len(dense) > SMOKE_CANDIDATES else dense
    out = [(UserHistoryView(np.zeros(0, np.int64), np.zeros(0, np.float32), {}), candidates)]
    for length, rating in ((min(len(pool), 30), 4.0), (min(len(pool), 5), 2.0)):
        items = pool[:length]
        out.append((UserHistoryView(items, np.full(len(items), rating, np.float32), {}), candidates))
    return out


def score_golden(model: LoadedModel, engine: ScoringEngine | None, builder: PromptBuilder | None, index: int,
                 view: UserHistoryView, candidates: np.ndarray) -> Scored:
    """One golden request scored by the candidate through the one scoring sequence, as the
    pipeline answers it: a version that serves its CRM runs no LLM."""
    return score_sequence(model, builder, engine, None, f"smoke-{index}", view, candidates).scored


def smoke_test(model: LoadedModel, engine: ScoringEngine | None, builder: PromptBuilder | None,
               report: ValidationReport) -> None:
    """Score the golden requests with the candidate exactly as the pipeline would; every score it
    computed (CRM, LLM, served) must be a probability. Records the served scores."""
    for i, (view, candidates) in enumerate(golden_requests(model)):
        scored = score_golden(model, engine, builder, i, view, candidates)
        _check_probabilities(scored.crm, f"golden request {i}: CRM")
        if scored.has_llm.any():
            _check_probabilities(scored.llm, f"golden request {i}: LLM")
        _check_probabilities(scored.final, f"golden request {i}: {scored.source} score")
        report.smoke_scores.append([float(x) for x in scored.final])
    report.checks.append(f"smoke test: {len(report.smoke_scores)} golden requests scored")


def _check_probabilities(p: np.ndarray, what: str) -> None:
    p = np.asarray(p, dtype=np.float64)
    if not np.isfinite(p).all():
        raise ValidationFailed(RefusalReason.SMOKE_TEST, f"{what} produced NaN or infinite scores")
    if (p < 0).any() or (p > 1).any():
        raise ValidationFailed(RefusalReason.SMOKE_TEST, f"{what} produced scores outside [0, 1]")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def collab_engine_refusal(model: LoadedModel, engine: ScoringEngine) -> str | None:
    """Why ``engine`` cannot serve ``model``'s collaborative tokens (None where it can, or the model
    has none): they need an engine that takes input embeddings by id (the embedded engine; not
    vLLM, docs/VLLM.md). The registry's check and the gateway's startup both ask this."""
    if model.collab is None or getattr(engine, "takes_embeds", False):
        return None
    return (f"this version's prompts carry collaborative tokens (the CRM's vectors as input embeddings), which the "
            f"{type(engine).__name__} cannot take: serve it on the embedded engine (RECLORA_ENGINE=torch)")


def check_collab(model: LoadedModel, spec: BaseModelSpec, engine: ScoringEngine) -> list[str]:
    """A version with collaborative tokens needs an engine that takes them (``collab_engine_refusal``)
    and a projector into the base model's embedding size."""
    if model.collab is None:
        return []
    refusal = collab_engine_refusal(model, engine)
    if refusal is not None:
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, refusal)
    hidden = {shape[0] for name, shape in spec.linear_shapes.items() if name.endswith("self_attn.q_proj")}
    if hidden and hidden != {model.collab.cfg.hidden_size}:
        raise ValidationFailed(RefusalReason.INCOMPATIBLE, f"the collaborative tokens are "
                               f"{model.collab.cfg.hidden_size}-d, the base model's embeddings {sorted(hidden)[0]}-d")
    return [f"collaborative tokens: {model.collab.cfg.user_dim}-d users and {model.collab.cfg.item_dim}-d items "
            f"into {model.collab.cfg.hidden_size}-d embeddings"]


def validate(bundle_dir: Path, spec: BaseModelSpec | None, *, max_rank: int, engine: ScoringEngine | None,
             builder_for, prototypes: bool = True,
             max_prototypes: int | None = None) -> tuple[LoadedModel, PromptBuilder | None, ValidationReport]:
    """Run every check on the bundle at ``bundle_dir``; the loaded model ready to swap in.

    ``builder_for(prompt_config)`` makes the prompt builder on the served tokenizer (None when the
    service runs no LLM); ``prototypes``: serve the bundle's prototype adapters where it has them,
    at most ``max_prototypes`` of them.
    """
    model = load_candidate(bundle_dir, prototypes=prototypes)
    report = ValidationReport(model.version, [f"bundle: {len(model.bundle.manifest.files)} files, hashes verified"])
    report.checks += check_weight_dtypes(model)
    builder = None
    if model.mixer is not None:
        if spec is None or engine is None:
            raise ValidationFailed(RefusalReason.NO_ENGINE, "this version has a LoRA but the service runs no LLM engine "
                                   "(it was started with a CRM-only version); restart it on an LLM version")
        report.checks += check_lora(model, spec, max_rank)
        report.checks += check_prototypes(model, max_prototypes)
        report.checks.append(f"prompt: {model.prompt.form} form ({model.prompt.version}), the LoRA's")
        report.checks += check_collab(model, spec, engine)
        builder = builder_for(model.prompt)
        if (spec.yes_id, spec.no_id) != (builder.yes_id, builder.no_id):
            raise ValidationFailed(RefusalReason.PROMPT_MISMATCH, f"the prompt's answer tokens ({builder.yes_id}, {builder.no_id}) "
                                   f"differ from the engine's ({spec.yes_id}, {spec.no_id})")
    try:
        smoke_test(model, engine, builder, report)
    except ValidationFailed:
        raise
    except Exception as exc:  # any failure to score is a refusal, never a crash of the service
        raise ValidationFailed(RefusalReason.SMOKE_TEST, f"scoring a golden request failed: {type(exc).__name__}: "
                               f"{_short(str(exc))}") from None
    return model, builder, report
