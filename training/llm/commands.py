"""``reclora`` commands for the LLM side: train the (personalized) LoRA, the report, the export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from training.cli_support import fail, timed

Mode = Literal["reclora", "rella"]
# The default form and request size follow `reclora prompt-forms` at the full budget (README, "LLM side"):
# the shared form trained on requests of 20 ranked validation and test no worse than per-target
# within one paired standard error, at a quarter of the tokens per request and 4.2x the training rate.
SHARED_REQUEST_SIZE = 20


def default_request_size(prompt_form: str, given: int | None) -> int:
    """The request size given, else the default of the prompt form (1 for per-target: no grouping)."""
    if given is not None:
        return given
    return SHARED_REQUEST_SIZE if prompt_form.replace("-", "_") == "shared" else 1


def prompt_settings(prompt_form: str, request_size: int | None, collab_tokens: bool) -> dict:
    """``LLMTrainConfig``'s prompt fields from the command-line spelling (per-target, an unset
    request size), as train-llm, sweep and sample-efficiency take them."""
    return {"prompt_form": prompt_form.replace("-", "_"),
            "request_size": default_request_size(prompt_form, request_size), "collab_tokens": collab_tokens}


def train_llm(
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory (with embeddings.npy)")],
    base_model: Annotated[Path, typer.Option(help="base LLM directory (from `reclora base-model`)")],
    out: Annotated[Path, typer.Option(help="output directory for the LoRA weights")],
    mode: Annotated[str, typer.Option(help="reclora (personalized, gated meta-LoRAs) or rella (one shared LoRA)")] = "reclora",
    crm: Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")] = None,
    n_samples: Annotated[int, typer.Option(help="training samples drawn from the train split")] = 2048,
    mixed: Annotated[bool, typer.Option(help="ReiT: train on recent-K and semantic views of every sample")] = True,
    k_text: int = 10, epochs: int = 1, batch_size: int = 8, grad_accum: int = 4, lr: float = 1e-3,
    n_meta: Annotated[int, typer.Option(help="meta-LoRAs per target module (RecLoRA)")] = 8,
    temperature: float = 1.0, rank: int = 8, valid_samples: int = 400, evals_per_epoch: int = 2,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 where native, else float32), float32 or bfloat16")] = "auto",
    seed: int = 0, threads: Optional[int] = None,
    objective: Annotated[str, typer.Option(
        help="answer (the answer token's cross entropy) or fused (BCE of w * CRM logit + LLM logit + b: the LLM "
             "learns what the CRM misses; writes fusion.json)")] = "answer",
    packing: Annotated[bool, typer.Option(
        help="padding-free packed micro-batches (--no-packing: right-padded rows, the older and slower loop)")] = True,
    pack_tokens: Annotated[int, typer.Option(
        help="packed micro-batch token budget (0: --batch-size instances per micro-batch); an optimizer step "
             "is --batch-size x --grad-accum instances either way")] = 0,
    checkpoint_every: Annotated[int, typer.Option(
        help="save the mid-run state every N optimizer steps (0: never); rerunning the same command in the "
             "same --out continues a stopped or killed run from it")] = 8,
    stop_after_minutes: Annotated[Optional[float], typer.Option(
        help="stop once a step ends past this many minutes, with the state saved; rerun to continue")] = None,
    prompt_form: Annotated[str, typer.Option(
        help="shared (one history for the candidate set in the prefix, short suffixes) or per-target (each "
             "candidate's own retrieved history in its suffix); the bundle serves the form trained")] = "shared",
    request_size: Annotated[Optional[int], typer.Option(
        help="shared form: train on requests of up to N candidates (a sample and its user's next ones), one "
             f"history retrieved for them all, the prefix computed once (1: each sample alone) [default: "
             f"{SHARED_REQUEST_SIZE} for the shared form, 1 for per-target]")] = None,
    collab_tokens: Annotated[bool, typer.Option(
        help="collaborative tokens: the frozen CRM's user vector (closing the prompt's prefix) and each "
             "candidate's item vector (in its suffix) as prompt tokens, projected into the LLM's embedding space "
             "by a small MLP trained with the LoRA; served by the embedded engine only")] = False,
) -> None:
    """Few2Many: train meta-LoRAs and gates (or one shared LoRA) with the frozen CRM.

    Under `torchrun --nproc-per-node N -m training.cli train-llm ...` the steps are shared out over
    the N processes (gloo on CPUs, nccl on GPUs) at the same global batch; rank 0 writes."""
    import numpy as np
    import torch

    from training.data.samples import PreparedData
    from training.distributed import process_group
    from training.llm.train import LLMTrainConfig
    from training.llm.train import train_llm as fit

    if mode not in ("reclora", "rella"):
        fail(f"--mode must be reclora or rella, not {mode!r}")
    if threads:
        torch.set_num_threads(threads)
    lora = dict(r=rank, lora_alpha=2.0 * rank, n_meta=n_meta if mode == "reclora" else 1,
                gated=mode == "reclora", temperature=temperature)
    cfg = LLMTrainConfig(n_samples=n_samples, k_text=k_text, mixed=mixed, epochs=epochs, batch_size=batch_size,
                         grad_accum=grad_accum, lr=lr, valid_samples=valid_samples, evals_per_epoch=evals_per_epoch,
                         seed=seed, dtype=dtype, lora=lora, objective=objective, packing=packing,
                         pack_tokens=pack_tokens, **prompt_settings(prompt_form, request_size, collab_tokens))
    try:
        cfg.check()
    except ValueError as exc:
        fail(str(exc))
    with timed("train-llm"), process_group(cfg.device) as ranks:
        prepared = PreparedData.load(data)
        try:
            summary = fit(prepared, np.load(data / "embeddings.npy", allow_pickle=False), crm or data / "crm",
                          base_model, out, cfg, checkpoint_every=max(checkpoint_every, 0),
                          stop_after_seconds=None if stop_after_minutes is None else 60.0 * stop_after_minutes,
                          ranks=ranks)
        except ValueError as exc:  # e.g. --out holds a stopped run with other settings
            fail(str(exc))
    if not ranks.is_main:
        return
    if summary.get("finished") is False:
        best = summary["best_valid_auc"]
        typer.echo(f"{mode}: stopped at step {summary['step']} of {summary['total_steps']} (best valid AUC so far: "
                   f"{f'{best:.4f}' if best >= 0 else 'none yet'}); rerun the same command to continue")
        return
    typer.echo(f"{mode}: best valid AUC {summary['best_valid_auc']:.4f} on {summary['instances']} instances, "
               f"{summary['train_seconds']:.0f} s training")


def llm_report(
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory")],
    base_model: Annotated[Path, typer.Option(help="base LLM directory")],
    out: Annotated[Path, typer.Option(help="report directory")],
    rella: Annotated[Optional[Path], typer.Option(help="ReLLa-style LoRA directory")] = None,
    reclora: Annotated[Optional[Path], typer.Option(help="RecLoRA directory")] = None,
    crm: Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")] = None,
    n_test: int = 2000, n_valid: int = 1000, seed: int = 0, k_text: int = 10,
    dtype: Annotated[str, typer.Option(help="scoring dtype; float32 keeps probabilities unquantized")] = "float32",
    batch_size: int = 16,
) -> None:
    """CRM, zero-shot, ReLLa-style, RecLoRA and fused on one seeded test subset (Markdown, JSON, ROC).

    Under torchrun the samples are scored in shares over the processes and gathered; rank 0 writes."""
    from training.distributed import process_group
    from training.llm.report import run_report

    with timed("llm-report"), process_group() as ranks:
        result = run_report(data, crm or data / "crm", base_model, rella, reclora, out, n_test=n_test,
                            n_valid=n_valid, seed=seed, k_text=k_text, dtype=dtype, batch_size=batch_size,
                            ranks=ranks)
    if not ranks.is_main:
        return
    typer.echo((out / "report.md").read_text())
    typer.echo(f"fusion: {result['fusion']}")


def sweep(
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory (with embeddings.npy)")],
    base_model: Annotated[Path, typer.Option(help="base LLM directory")],
    out: Annotated[Path, typer.Option(help="sweep directory: runs/<setting>/, sweep.md, sweep.json, test.json")],
    crm: Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")] = None,
    n_meta: Annotated[str, typer.Option(help="meta-LoRAs per target module, comma-separated")] = "8,16",
    temperature: Annotated[str, typer.Option(help="gate temperatures, comma-separated")] = "1,5",
    n_samples: Annotated[str, typer.Option(
        help="training samples: counts or percentages of the training split, comma-separated")] = "2048,10%",
    epochs: Annotated[str, typer.Option(help="epochs, comma-separated")] = "1",
    lr: Annotated[str, typer.Option(help="learning rates, comma-separated")] = "1e-3",
    max_runs: Annotated[Optional[int], typer.Option(
        help="run only the first N settings of the grid in a seeded random order (a larger N extends the sweep)")]
        = None,
    valid_samples: Annotated[int, typer.Option(help="validation samples each run is selected on")] = 400,
    n_test: Annotated[int, typer.Option(help="test samples the selected run is scored on, once")] = 2000,
    objective: Annotated[str, typer.Option(
        help="train-llm's objective: answer, or fused (runs are then selected on the fused valid AUC)")] = "answer",
    prompt_form: Annotated[str, typer.Option(help="train-llm's prompt form: shared or per-target")] = "shared",
    request_size: Annotated[Optional[int], typer.Option(
        help=f"train-llm's --request-size [default: {SHARED_REQUEST_SIZE} for the shared form, 1 for per-target]")]
        = None,
    collab_tokens: Annotated[bool, typer.Option(help="train-llm's --collab-tokens, for every run")] = False,
    k_text: int = 10, batch_size: int = 8, grad_accum: int = 4, rank: int = 8, evals_per_epoch: int = 2,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 where native, else float32), float32 or bfloat16")]
        = "auto",
    seed: int = 0, threads: Optional[int] = None,
) -> None:
    """Train the personalized LoRA over a grid, select on validation AUC, score the test subset once.

    A run whose directory holds train.json is read back, not trained again: rerun to resume."""
    import torch

    from training.llm.sweep import SweepConfig, parse_list, run_sweep
    from training.llm.train import LLMTrainConfig

    if threads:
        torch.set_num_threads(threads)
    try:
        template = LLMTrainConfig(k_text=k_text, batch_size=batch_size, grad_accum=grad_accum,
                                  valid_samples=valid_samples, evals_per_epoch=evals_per_epoch, dtype=dtype,
                                  lora=dict(r=rank, lora_alpha=2.0 * rank), objective=objective,
                                  **prompt_settings(prompt_form, request_size, collab_tokens))
        template.check()
        config = SweepConfig(n_meta=parse_list(n_meta, int, "n-meta"),
                             temperature=parse_list(temperature, float, "temperature"),
                             n_samples=parse_list(n_samples, str, "n-samples"),
                             epochs=parse_list(epochs, int, "epochs"),
                             lr=parse_list(lr, float, "lr"), max_runs=max_runs, seed=seed, n_test=n_test,
                             template=template)
        with timed("sweep"):
            result = run_sweep(data, crm or data / "crm", base_model, out, config, echo=typer.echo)
    except ValueError as exc:
        fail(str(exc))
    typer.echo((out / "sweep.md").read_text())
    typer.echo(f"selected {result['selected']}; table in {out / 'sweep.md'} and {out / 'sweep.json'}")





COMMANDS = {
    "train-llm": train_llm,
    "llm-report": llm_report,
    "sweep": sweep,
}


def register(app: typer.Typer) -> None:
    """Add these commands to the ``reclora`` app."""
    for name, command in COMMANDS.items():
        app.command(name)(command)
