"""Study commands: `reclora sample-efficiency` (the Laser study of models trained on shares of the
training data), `reclora prompt-forms` (trained LoRAs of either prompt form judged on requests) and
`reclora prototypes` (what P prototype adapters cost against every user's own mixture)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.cli_support import fail, timed
from training.llm.commands import SHARED_REQUEST_SIZE, prompt_settings


# Options the studies that judge trained LoRAs on requests share.
DataDir = Annotated[Path, typer.Option("--data", help="prepared dataset directory (with embeddings.npy)")]
CrmDir = Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")]
ValidSamples = Annotated[int, typer.Option(help="seeded validation draw (as llm-report and the sweep)")]
TestSamples = Annotated[int, typer.Option(help="seeded test subset (as llm-report)")]
RequestSize = Annotated[int, typer.Option(help="candidates per request at most (a user's rows in time order)")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 where native, else float32), float32 or bfloat16")]


def _requests(valid_samples: int, n_test: int, request_size: int, seed: int, dtype: str, k_text: int,
              threads: int | None):
    """The requests a study scores (``FormsConfig``), its options checked; sets torch's threads."""
    import torch

    from training.studies.prompt_forms import FormsConfig

    if request_size < 1 or valid_samples < 10 or n_test < 10:
        fail("--request-size must be at least 1, --valid-samples and --n-test at least 10")
    if threads:
        torch.set_num_threads(threads)
    return FormsConfig(valid_samples=valid_samples, n_test=n_test, request_size=request_size, seed=seed, dtype=dtype,
                       k_text=k_text)


def _numbers(text: str, flag: str, kind: type) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}")
    return values


def sample_efficiency(
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory (with embeddings.npy)")],
    out: Annotated[Path, typer.Option(help="study directory: runs/, sample_efficiency.{json,md,png}")],
    knowledge: Annotated[Optional[Path], typer.Option(help="knowledge directory: adds the CRM + knowledge runs")]
        = None,
    base_model: Annotated[Optional[Path], typer.Option(help="base LLM directory (needed unless --no-llm)")] = None,
    crm: Annotated[Optional[Path], typer.Option(
        help="full-data CRM checkpoint whose user vectors the LLM reads (default DATA/crm)")] = None,
    fractions: Annotated[str, typer.Option(help="shares of the training samples")] = "0.01,0.05,0.1,0.25,1",
    crm_models: Annotated[str, typer.Option(
        help="which of popularity, logistic, crm, crm_knowledge to run (a part of the study, e.g. in a "
             "second process on the same --out; rerun with all to write the whole report)")]
        = "popularity,logistic,crm,crm_knowledge",
    seeds: Annotated[str, typer.Option(help="subset and training seeds at shares up to --many-seeds-up-to")]
        = "0,1,2",
    seeds_above: Annotated[str, typer.Option(help="seeds at larger shares")] = "0",
    many_seeds_up_to: float = 0.1,
    n_test: Annotated[int, typer.Option(help="seeded test subset, as `reclora llm-report`")] = 2000,
    test_seed: int = 0,
    epochs: Annotated[int, typer.Option(help="CRM epochs (early stopping on validation AUC)")] = 20,
    batch_size: Annotated[int, typer.Option(help="CRM batch; smaller for small shares, see --min-batches")] = 1024,
    lr: float = 2e-3, patience: int = 3,
    min_batches: Annotated[int, typer.Option(help="CRM batches per epoch at least (small shares)")] = 20,
    llm_samples: Annotated[str, typer.Option(help="LLM training sample counts N")] = "64,256,1024",
    llm_models: Annotated[str, typer.Option(help="reclora and/or rella")] = "reclora,rella",
    llm_seeds: Annotated[Optional[str], typer.Option(
        help="LLM seeds (default: as the CRM side, by the share N is of the training samples)")] = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="CRM side only")] = False,
    llm_epochs: int = 1, llm_valid_samples: int = 400, k_text: int = 10,
    rank: int = 8, n_meta: Annotated[int, typer.Option(help="meta-LoRAs per target module (RecLoRA)")] = 8,
    dtype: Annotated[str, typer.Option(help="LLM training dtype: auto, float32 or bfloat16")] = "auto",
    prompt_form: Annotated[str, typer.Option(
        help="the LLM runs' prompt form: per-target (each sample's own history, as the papers and this study's "
             "published figures) or shared (train-llm's default)")] = "per-target",
    request_size: Annotated[Optional[int], typer.Option(
        help=f"train-llm's --request-size [default: {SHARED_REQUEST_SIZE} for the shared form, 1 for per-target]")]
        = None,
    collab_tokens: Annotated[bool, typer.Option(help="train-llm's --collab-tokens, for every LLM run")] = False,
    threads: Optional[int] = None,
) -> None:
    """Train the CRM (with and without knowledge), the baselines and the LLM on shares of the training data."""
    import numpy as np
    import torch

    from service.crm.model import CRMConfig
    from training.data.samples import PreparedData
    from training.studies.sample_efficiency import (StudyConfig, StudyInputs, crm_defaults, llm_defaults,
                                                    protocol_summary, run_study)
    from training.studies.sample_efficiency_report import MARKDOWN_FILE, write_report

    if threads:
        torch.set_num_threads(threads)
    llm_names = () if no_llm else tuple(m.strip() for m in llm_models.split(",") if m.strip())
    crm_dir = crm or data / "crm"
    if llm_names:
        if base_model is None:
            fail("--base-model is required for the LLM runs (or pass --no-llm)")
        if not (crm_dir / "config.json").is_file():
            fail(f"{crm_dir} is not a CRM checkpoint: the LLM reads a full-data CRM's user vectors "
                 f"(run `reclora train-crm --data {data}` or pass --crm), or pass --no-llm")
        if CRMConfig.model_validate_json((crm_dir / "config.json").read_text()).knowledge_dim:
            fail(f"{crm_dir} is a CRM with knowledge: the LLM runs read a plain full-data CRM's user vectors "
                 "(pass --crm)")
    base_crm = crm_defaults()
    base_llm = llm_defaults()
    cfg = StudyConfig(
        fractions=_numbers(fractions, "--fractions", float),
        crm_models=tuple(m.strip() for m in crm_models.split(",") if m.strip()), seeds=_numbers(seeds, "--seeds", int),
        seeds_above=_numbers(seeds_above, "--seeds-above", int), many_seeds_up_to=many_seeds_up_to,
        n_test=n_test, test_seed=test_seed, min_batches_per_epoch=min_batches,
        crm=dataclasses.replace(base_crm, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience),
        llm_samples=_numbers(llm_samples, "--llm-samples", int), llm_models=llm_names,
        llm_seeds=None if llm_seeds is None else _numbers(llm_seeds, "--llm-seeds", int),
        llm=dataclasses.replace(base_llm, epochs=llm_epochs, valid_samples=llm_valid_samples, k_text=k_text,
                                dtype=dtype, lora={**base_llm.lora, "r": rank, "lora_alpha": 2.0 * rank,
                                                   "n_meta": n_meta},
                                **prompt_settings(prompt_form, request_size, collab_tokens)))
    if llm_names:
        try:
            cfg.llm.check()
        except ValueError as exc:
            fail(str(exc))
    with timed("sample-efficiency"):
        try:
            prepared = PreparedData.load(data)
        except FileNotFoundError as exc:
            fail(str(exc))
        embeddings_path = data / "embeddings.npy"
        if not embeddings_path.is_file():
            fail(f"{embeddings_path} not found: run `reclora embed --data {data}` first")
        arrays = None
        if knowledge is not None:
            from training.crm.knowledge import load_knowledge

            try:
                arrays = load_knowledge(knowledge, prepared)
            except ValueError as exc:  # KnowledgeError names the directory and what is wrong
                fail(str(exc))
        inputs = StudyInputs(prepared, np.load(embeddings_path, allow_pickle=False), knowledge=arrays,
                             knowledge_dir=knowledge, crm_dir=crm_dir if llm_names else None,
                             base_dir=base_model if llm_names else None)
        protocol = protocol_summary(inputs, cfg)
        try:  # the plan and every subset are checked before the first run
            rows = run_study(inputs, cfg, out, on_progress=lambda rows: write_report(rows, protocol, out, figure=False))
        except ValueError as exc:
            fail(str(exc))
        write_report(rows, protocol, out)
    typer.echo((out / MARKDOWN_FILE).read_text())


def prompt_forms(
    data: DataDir,
    base_model: Annotated[Path, typer.Option(help="base LLM directory the LoRAs were trained on")],
    lora: Annotated[list[str], typer.Option(
        help="NAME=DIR of a trained LoRA (train-llm --out), repeated; the first is the one the others are "
             "compared with")],
    out: Annotated[Path, typer.Option(help="study directory: prompt_forms.{json,md}, scores/")],
    crm: CrmDir = None, valid_samples: ValidSamples = 2000, n_test: TestSamples = 2000, request_size: RequestSize = 20,
    dtype: Dtype = "auto", seed: int = 0, k_text: int = 10, threads: Optional[int] = None,
) -> None:
    """Judge trained LoRAs of either prompt form on the same requests, as served: AUCs alone and
    fused, paired differences with standard errors, tokens and milliseconds per request."""
    from training.studies.prompt_forms import run_prompt_forms

    loras: dict[str, Path] = {}
    for item in lora:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            fail(f"--lora takes NAME=DIR, got {item!r}")
        if not (Path(directory) / "config.json").is_file():
            fail(f"--lora {name}: {directory} holds no trained LoRA (config.json)")
        loras[name] = Path(directory)
    cfg = _requests(valid_samples, n_test, request_size, seed, dtype, k_text, threads)
    with timed("prompt-forms"):
        run_prompt_forms(data, crm or data / "crm", base_model, loras, out, cfg, echo=typer.echo)
    typer.echo((out / "prompt_forms.md").read_text())


def prototypes(
    data: DataDir,
    base_model: Annotated[Path, typer.Option(help="base LLM directory the LoRA was trained on")],
    lora: Annotated[Path, typer.Option(help="a trained RecLoRA directory (train-llm --out)")],
    out: Annotated[Path, typer.Option(help="study directory: prototypes.{json,md}, scores/")],
    counts: Annotated[str, typer.Option(help="prototype counts P to compare with exact mixtures")] = "1,4,16,64,256",
    crm: CrmDir = None, valid_samples: ValidSamples = 2000, n_test: TestSamples = 2000, request_size: RequestSize = 20,
    dtype: Dtype = "auto", seed: int = 0, k_text: int = 10, threads: Optional[int] = None,
) -> None:
    """What P prototype adapters cost against every user's own mixture: validation AUCs alone and
    fused with paired standard errors per P, the smallest P within one standard error once on test."""
    from training.studies.prototypes import PrototypesConfig, run_prototypes

    if not (lora / "config.json").is_file():
        fail(f"--lora: {lora} holds no trained LoRA (config.json)")
    sizes = _numbers(counts, "--counts", int)
    if not sizes or min(sizes) < 1:
        fail(f"--counts takes positive prototype counts, got {counts!r}")
    cfg = PrototypesConfig(tuple(sorted(set(sizes))), _requests(valid_samples, n_test, request_size, seed, dtype,
                                                                 k_text, threads))
    with timed("prototypes"):
        run_prototypes(data, crm or data / "crm", base_model, lora, out, cfg, echo=typer.echo)
    typer.echo((out / "prototypes.md").read_text())


COMMANDS = {
    "prompt-forms": prompt_forms,
    "prototypes": prototypes,
    "sample-efficiency": sample_efficiency,
}


def register(app: typer.Typer) -> None:
    """Add these commands to the ``reclora`` app."""
    for name, command in COMMANDS.items():
        app.command(name)(command)
