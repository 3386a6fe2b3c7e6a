"""Few2Many: train meta-LoRAs and gates on a small sample, with the frozen CRM's user vectors.

The same loop trains the ReLLa-style baseline (one shared LoRA: ``n_meta = 1``, no gate). Two
objectives: ``answer`` (the causal-LM loss on the answer token only: full-vocabulary cross entropy
at the answer position) and ``fused`` (binary cross entropy of w * CRM logit + (logit_Yes -
logit_No) + b, w and b learned: the LLM learns what the frozen CRM misses, and serving's fusion
applies the result unchanged). Checkpoints are selected on validation AUC (the fused AUC for the
fused objective), never on test.

A run is a few steps: the model (``build_model``); the samples (``prepare_samples``: prompts
tokenized once, the CRM checkpoint loaded once and each draw encoded once); the objective and its
optimizer (``build_optimization``); a stopped run's state put back (``resume_or_start``); the loop
(``train_loop``: optimizer steps, validation and selection, the mid-run state); and the outputs
(``write_outputs``). How one optimizer step's instances become forwards is ``training.llm.train_step``'s.

Under torchrun (``training.distributed``) every rank builds the same model and the same global
instance order, and takes a contiguous share of each optimizer step's units; the trainable
gradients are then summed over the ranks (each share's loss is divided by the whole step's
instance count, as one process divides), so a step equals the single-process step at the same
global batch, to floating-point summation order. Validation scores are sharded and gathered, so
every rank selects alike; rank 0 alone writes checkpoints, the mid-run state and ``train.json``.
Dropout (the gates') draws from each rank's own stream, seeded by rank and step: with dropout a
distributed run is the same training in distribution, without it the same run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from service.llm.personalized_lora import PersonalizedLoRA, PersonalizedLoRAConfig
from service.llm.prompt import PROMPT_FORMS
from service.model.fusion import FUSION_FILE, logit
from training.crm.train import seed_everything
from training.data.samples import PreparedData
from training.distributed import Ranks, current, rank_step_seed
from training.llm.collab import CollabInputs, new_projector
from training.llm.crm_outputs import CRMOutputs, FrozenCRM
from training.llm.fusion_fit import validation_subset
from training.llm.requests import anchored_requests, request_slices
from training.llm.loading import load_base
from training.llm.offline_scoring import LLMScorer
from training.llm.prompts import View, prompt_config_for
from training.llm.resume import RESUME_DIR, Progress, clear_state, load_state, restore, save_state
from training.llm.train_step import AnswerLoss, FusedLoss, TrainSet, accumulate_step
from training.metrics import binary_metrics

OBJECTIVES = ("answer", "fused")


@dataclass
class LLMTrainConfig:
    n_samples: int = 2048
    k_text: int = 10
    mixed: bool = True  # ReiT: recent-K and semantic views of every sample
    epochs: int = 1
    batch_size: int = 8  # instances per micro-batch (padded rows; packed rows without pack_tokens)
    grad_accum: int = 4  # micro-batches per optimizer step: a step is batch_size * grad_accum instances
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    valid_samples: int = 400
    evals_per_epoch: int = 2
    seed: int = 0
    dtype: str = "auto"  # see service.llm.precision.resolve_dtype
    device: str = "auto"  # cuda when available, else cpu
    progress: bool = True
    lora: dict = field(default_factory=dict)  # PersonalizedLoRAConfig fields
    objective: str = "answer"  # or "fused" (see the module docstring)
    packing: bool = True  # padding-free packed micro-batches; False: right-padded rows
    pack_tokens: int = 0  # packed micro-batch token budget; 0: batch_size instances per micro-batch
    prompt_form: str = "per_target"  # or "shared" (service.llm.prompt); the bundle serves the form trained
    request_size: int = 1  # shared form: candidates per training request (training.llm.requests); 1: one each
    collab_tokens: bool = False  # the CRM's user and item vectors as prompt tokens, projected by a trained MLP

    def changed_from(self, recorded: dict) -> list[str]:
        """The settings that differ from ``recorded`` (an earlier run's ``asdict`` as JSON); showing
        progress bars or not is no setting of the run, and a setting the record predates ran at
        its default."""
        defaults = asdict(LLMTrainConfig())
        return sorted(k for k, v in asdict(self).items()
                      if k != "progress" and json.loads(json.dumps(v)) != recorded.get(k, defaults[k]))

    def check(self) -> None:
        """A clear ValueError for settings the loop cannot run."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        for name in ("n_samples", "epochs", "batch_size", "grad_accum", "valid_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pack_tokens < 0:
            raise ValueError(f"pack_tokens must be 0 (batch_size instances) or a token budget, got {self.pack_tokens}")
        if self.pack_tokens and not self.packing:
            raise ValueError("pack_tokens applies to packed micro-batches only (packing is off)")
        if self.prompt_form not in PROMPT_FORMS:
            raise ValueError(f"prompt_form must be one of {', '.join(PROMPT_FORMS)}, not {self.prompt_form!r}")
        if self.request_size < 1:
            raise ValueError(f"request_size must be at least 1, got {self.request_size}")
        if self.request_size > 1 and (self.prompt_form != "shared" or not self.packing):
            raise ValueError("requests of several candidates train the shared prompt form, packed "
                             "(--prompt-form shared, packing on)")

    @property
    def fused(self) -> bool:
        """The fused objective: the loop then also reads the CRM's probabilities and trains w and b."""
        return self.objective == "fused"


@dataclass
class RunModel:
    """The base model with the LoRA being trained, and the scorer that validates it."""

    scorer: LLMScorer
    lora: PersonalizedLoRA

    @property
    def model(self):
        return self.scorer.model


@dataclass
class RunSamples:
    """A run's training instances and validation draw, prepared once."""

    instances: TrainSet
    valid: pd.DataFrame
    valid_prompts: list[list[int]]
    valid_crm: CRMOutputs  # user vectors (and, for the fused objective, probabilities) of ``valid``
    valid_items: torch.Tensor | None = None  # collaborative tokens: the CRM's item vector of each of ``valid``


@dataclass
class Optimization:
    """The objective and what steps it, with the step counts the schedule and the loop share."""

    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # draws each epoch's instance order
    step_size: int  # units (prompts or requests) per optimizer step
    total_steps: int
    eval_every: int


@dataclass
class Run:
    """What one call of ``train_llm`` built, for the steps that use it."""

    cfg: LLMTrainConfig
    out_dir: Path
    model: RunModel
    samples: RunSamples
    opt: Optimization
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a torchrun job


@dataclass(frozen=True)
class Stops:
    """When a call saves the mid-run state and when it stops (see ``train_llm``)."""

    checkpoint_every: int
    after_steps: int | None
    after_seconds: float | None

    def stopping(self, step: int, total_steps: int, steps_this_call: int, call_start: float) -> bool:
        """Whether this call ends after ``step``: never after the last step, which finishes the run."""
        return step < total_steps and (
            (self.after_steps is not None and steps_this_call >= self.after_steps)
            or (self.after_seconds is not None and time.perf_counter() - call_start >= self.after_seconds))

    def checkpointing(self, step: int, total_steps: int) -> bool:
        """Whether the mid-run state is saved after ``step``: the last step writes the outputs instead."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < total_steps


def train_llm(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, out_dir: Path,
              cfg: LLMTrainConfig, *, checkpoint_every: int = 8, stop_after_steps: int | None = None,
              stop_after_seconds: float | None = None, ranks: Ranks | None = None) -> dict:
    """Train, keep the best validation checkpoint in ``out_dir``; returns the training summary.

    Every ``checkpoint_every`` optimizer steps (0: never) the mid-run state goes to ``out_dir/resume``
    (``training.llm.resume``); a call that finds one continues from it (one left by other settings
    is refused), so a run longer than one sitting can be stopped and continued; a killed run loses
    at most ``checkpoint_every`` steps. ``stop_after_steps`` (or ``stop_after_seconds``) ends this
    call after that many of its steps (or once a step ends past that time), with the state saved:
    its summary says ``finished: False`` and no ``train.json`` is written.

    ``ranks`` (default: the torchrun process group joined, else one process) shares the steps
    and validation out (see the module docstring); every rank returns the same summary."""
    cfg.check()
    ranks = current() if ranks is None else ranks
    seed_everything(cfg.seed)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(base_dir, data, cfg)
    model.scorer.ranks = ranks
    samples = prepare_samples(data, embeddings, crm_dir, cfg, model.scorer)
    run = Run(replace(cfg, progress=cfg.progress and ranks.is_main), out_dir, model, samples,
              build_optimization(cfg, model, samples.instances), ranks)
    resumed, order = resume_or_start(run)
    ranks.barrier()  # every rank has read the stopped run's state before rank 0 may replace it
    state, finished = train_loop(run, resumed, order, Stops(checkpoint_every, stop_after_steps, stop_after_seconds))
    if not finished:
        return {"finished": False, "step": state.step, "total_steps": run.opt.total_steps,
                "best_valid_auc": state.best_auc, "history": state.history, "train_seconds": state.seconds,
                "instances": samples.instances.n_instances}
    return write_outputs(run, state)


def build_model(base_dir: Path, data: PreparedData, cfg: LLMTrainConfig) -> RunModel:
    """The base model with a fresh LoRA, worded as the dataset names its items ("movie", "book",
    ...), in the run's prompt form. Built first after seeding: the LoRA's initial weights follow
    from the seed."""
    lora_cfg = PersonalizedLoRAConfig(**cfg.lora)
    model, tokenizer = load_base(base_dir, cfg.dtype, cfg.device)
    lora = PersonalizedLoRA(model, lora_cfg).to(model.device)
    prompt = prompt_config_for(data.meta, cfg.prompt_form, collab_tokens=cfg.collab_tokens)
    return RunModel(LLMScorer(model, tokenizer, lora, cfg.k_text, prompt), lora)


def prepare_samples(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, cfg: LLMTrainConfig,
                    scorer: LLMScorer) -> RunSamples:
    """The seeded train and validation draws as the loop reads them: every prompt tokenized once,
    and the CRM checkpoint loaded once, each draw encoded once for its user vectors (and, for the
    fused objective, its probabilities)."""
    split = data.split("train")
    grouped = cfg.request_size > 1
    train = (anchored_requests(split, min(cfg.n_samples, len(split)), cfg.request_size, cfg.seed) if grouped
             else split.sample(n=min(cfg.n_samples, len(split)), random_state=cfg.seed))
    valid = validation_subset(data, cfg.valid_samples, cfg.seed)
    crm = FrozenCRM.load(crm_dir, data, embeddings)
    train_crm, valid_crm = crm.outputs(train), crm.outputs(valid)
    reads = 4 if cfg.fused else 2  # the draws' user vectors, and with the fused objective their probabilities
    crm.draw_initial_weights(reads - 1)  # the load drew once
    views: list[View] = ["recent", "semantic"] if cfg.mixed else ["semantic"]
    crm_logits = None
    if cfg.fused:
        crm_logits = torch.from_numpy(logit(train_crm.probabilities)).float().repeat(len(views))
    labels, builder = train["label"].tolist() * len(views), scorer.builder
    if grouped:  # a request's rows read one history, so one user vector
        firsts = [part.start for part in request_slices(train)]
        requests = [r for view in views for r in scorer.request_prompts(data, train, embeddings, view)]
        instances = TrainSet.build_requests(requests, torch.cat([train_crm.user_reps[firsts]] * len(views)), labels,
                                            builder.yes_id, builder.no_id, scorer.model.device, crm_logits)
    else:
        prompts = [p for view in views for p in scorer.prompts(data, train, embeddings, view)]
        instances = TrainSet.build(prompts, torch.cat([train_crm.user_reps] * len(views)), labels, builder.yes_id,
                                   builder.no_id, scorer.model.device, crm_logits)
    valid_items = None
    if cfg.collab_tokens:  # drawn last: a run without collaborative tokens draws as before
        scorer.collab = new_projector(crm.model, scorer.model)
        instances.collab = CollabInputs(scorer.collab, builder.collab_id,
                                        torch.cat([train_crm.item_reps] * len(views)).to(scorer.model.device))
        valid_items = valid_crm.item_reps
    return RunSamples(instances, valid, scorer.prompts(data, valid, embeddings, "semantic"), valid_crm, valid_items)


def build_optimization(cfg: LLMTrainConfig, model: RunModel, instances: TrainSet) -> Optimization:
    """The objective, AdamW over the LoRA (and the fused objective's w and b, not decayed), and the
    warmup-then-linear-decay schedule over the run's steps."""
    builder = model.scorer.builder
    loss_fn = FusedLoss(model.model, builder.yes_id, builder.no_id) if cfg.fused else AnswerLoss(model.model)
    groups: list[dict] = [{"params": [p for p in model.lora.parameters() if p.requires_grad]}]
    if cfg.fused:
        groups.append({"params": list(loss_fn.parameters()), "weight_decay": 0.0})
    if model.scorer.collab is not None:  # collaborative tokens: the projector trains with the LoRA
        groups.append({"params": list(model.scorer.collab.parameters())})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step_size = instances.units_per(cfg.batch_size * cfg.grad_accum)
    steps_per_epoch = math.ceil(len(instances) / step_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(total_steps - warmup, 1))))
    return Optimization(loss_fn, optimizer, schedule, torch.Generator().manual_seed(cfg.seed), step_size, total_steps,
                        eval_every=max(1, steps_per_epoch // max(cfg.evals_per_epoch, 1)))


def resume_or_start(run: Run) -> tuple[Progress, list[int] | None]:
    """(progress, the stopped epoch's instance order) of a run stopped in ``out_dir``, its weights,
    optimizer, schedule and generators put back; a fresh start where none was stopped. A stopped
    run with other settings is refused: continuing it would train neither run."""
    kept = load_state(run.out_dir)
    if kept is None:
        return Progress(), None
    progress, meta, tensors = kept
    changed = run.cfg.changed_from(meta["config"])
    if changed:
        raise ValueError(f"{run.out_dir} holds a stopped run with other settings ({', '.join(changed)}): train "
                         f"into another directory, or delete {run.out_dir / RESUME_DIR} to start over")
    opt = run.opt
    weights, extra, order = restore(meta, tensors, opt.optimizer, opt.schedule, opt.generator)
    run.model.lora.load_trainable_state_dict(weights)
    extra_params = extra_parameters(run)
    with torch.no_grad():
        for name, value in extra.items():
            extra_params[name].copy_(value)
    if run.cfg.progress:
        tqdm.write(f"resuming {run.out_dir} at step {progress.step} of {opt.total_steps}")
    return progress, order


def train_loop(run: Run, resumed: Progress, order: list[int] | None, stops: Stops) -> tuple[Progress, bool]:
    """Optimizer steps from where ``resumed`` stands to the end of the last epoch, validating every
    ``eval_every`` steps and saving the mid-run state as ``stops`` says; returns (the progress,
    whether the run finished). A stop is decided after a step, never within one."""
    cfg, opt = run.cfg, run.opt
    state = replace(resumed)
    start, call_start = time.perf_counter() - resumed.seconds, time.perf_counter()
    bar = tqdm(total=opt.total_steps, initial=state.step, desc="llm train", disable=not cfg.progress)
    for epoch in range(resumed.epoch, cfg.epochs):
        if order is not None and epoch == resumed.epoch:  # the epoch the stopped run was in
            first = resumed.position
        else:
            order = torch.randperm(len(run.samples.instances), generator=opt.generator).tolist()
            first, state.running, state.tokens, state.seen = 0, 0.0, 0, 0
        state.epoch = epoch
        for begin in range(first, len(order), opt.step_size):
            optimizer_step(run, order[begin : begin + opt.step_size], state)
            bar.update(1)
            bar.set_postfix(loss=f"{state.running / max(state.seen, 1):.4f}",
                            tok_s=f"{state.tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            if state.step % opt.eval_every == 0 or state.step == opt.total_steps:
                validate_and_select(run, state, start)
            stopping = stops.stopping(state.step, opt.total_steps, state.step - resumed.step, call_start)
            stopping = run.ranks.any(stopping) if stops.after_seconds is not None else stopping  # clocks differ
            if stopping or stops.checkpointing(state.step, opt.total_steps):
                state.position, state.seconds = begin + opt.step_size, time.perf_counter() - start
                if run.ranks.is_main:
                    save_state(run.out_dir, asdict(cfg), state, order,
                               run.model.lora.trainable_state_dict(), opt.optimizer, opt.schedule,
                               extra_parameters(run), opt.generator)
                run.ranks.barrier()
            if stopping:
                bar.close()
                state.seconds = time.perf_counter() - start
                return state, False
    bar.close()
    state.seconds = time.perf_counter() - start
    return state, True


def extra_parameters(run: Run) -> dict[str, torch.nn.Parameter]:
    """What the mid-run state keeps beside the LoRA: the fused objective's w and b, and the
    collaborative tokens' projector."""
    collab = run.model.scorer.collab
    return {**dict(run.opt.loss_fn.named_parameters()),
            **({} if collab is None else {f"collab.{k}": v for k, v in collab.named_parameters()})}


def optimizer_step(run: Run, rows: list[int], state: Progress) -> None:
    """One optimizer step over the units ``rows``; the epoch's running loss, instances and tokens
    grow by it. A rank of a distributed run forwards its share of ``rows`` and the gradients are
    summed over the ranks before the step.

    Why not DistributedDataParallel: its gradient hooks need the forward to be one call of the
    wrapped module, while a step here runs the base model under the LoRA's user context and a loss
    module with parameters of its own (the fused objective's w and b); and the last step of an
    epoch can leave a rank no units at all, which DDP cannot reduce without a Join. What DDP with
    ``no_sync`` would do is done explicitly: the micro-batches accumulate locally and the trainable
    gradients (the LoRA's, the gates', w and b) go in one flat all-reduce per optimizer step."""
    model, opt, ranks, data = run.model, run.opt, run.ranks, run.samples.instances
    model.lora.train()
    n_instances = len(data.instances(rows))
    if ranks.distributed:
        torch.manual_seed(rank_step_seed(run.cfg.seed, state.step, ranks.rank))
    loss_sum, n_tokens = accumulate_step(model.model, model.lora, opt.loss_fn, data, rows[ranks.share(len(rows))],
                                         run.cfg, model.scorer.pad_id, n_instances)
    if ranks.distributed:
        ranks.sum_gradients([p for group in opt.optimizer.param_groups for p in group["params"]])
        loss_sum, n_tokens = ranks.sum([loss_sum, n_tokens])
    state.running += loss_sum
    state.seen += n_instances
    state.tokens += int(n_tokens)
    opt.optimizer.step()
    opt.schedule.step()
    opt.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def validate(run: Run) -> dict:
    """The LoRA as it stands on the validation draw: its AUC, and with the fused objective the
    fused AUC (what selects) and the fusion that gives it."""
    samples = run.samples
    probs = run.model.scorer.score(samples.valid_prompts, samples.valid_crm.user_reps, item_reps=samples.valid_items)
    labels = samples.valid["label"].to_numpy()
    auc = binary_metrics(labels, probs)["auc"]
    if not run.cfg.fused:
        return {"valid_auc": auc}
    fusion = run.opt.loss_fn.fusion()
    fused_auc = binary_metrics(labels, fusion(probs, samples.valid_crm.probabilities))["auc"]
    return {"valid_auc": fused_auc, "valid_llm_auc": auc, "fusion": fusion.to_json()}


def validate_and_select(run: Run, state: Progress, start: float) -> None:
    """Validate, add it to the history, and keep the weights (and the fusion) in ``out_dir`` when
    they validate best so far: the run's output is its best checkpoint, not its last."""
    result = validate(run)
    auc, train_loss = result["valid_auc"], state.running / max(state.seen, 1)
    state.history.append({"step": state.step, "epoch": state.epoch + 1, "train_loss": train_loss, **result,
                          "seconds": time.perf_counter() - start})
    if run.cfg.progress:
        tqdm.write(f"step {state.step}: loss {train_loss:.4f}, valid AUC {auc:.4f}"
                   + (f" (fused; LLM alone {result['valid_llm_auc']:.4f})" if run.cfg.fused else ""))
    if auc > state.best_auc:
        state.best_auc = auc
        if not run.ranks.is_main:
            if run.cfg.fused:
                state.best_fusion = run.opt.loss_fn.fusion().to_json()
            return
        save_file({k: v.detach().cpu().contiguous() for k, v in run.model.lora.trainable_state_dict().items()},
                  run.out_dir / "weights.safetensors")
        if run.model.scorer.collab is not None:
            run.model.scorer.collab.save(run.out_dir)
        if run.cfg.fused:
            state.best_fusion = run.opt.loss_fn.fusion().to_json()
            (run.out_dir / FUSION_FILE).write_text(json.dumps(state.best_fusion, indent=2))


def write_outputs(run: Run, state: Progress) -> dict:
    """The finished run's ``config.json`` (the LoRA's) and ``train.json`` (the summary, returned);
    its mid-run state goes, as nothing is left to continue."""
    cfg, lora_cfg, out_dir = run.cfg, run.model.lora.cfg, run.out_dir
    summary = {"config": asdict(cfg), "lora": lora_cfg.model_dump(), "prompt": run.model.scorer.prompt.record(),
               "best_valid_auc": state.best_auc, "history": state.history, "train_seconds": state.seconds,
               "instances": run.samples.instances.n_instances}
    if run.ranks.distributed:  # a single process writes what it always wrote
        summary["processes"] = run.ranks.world
    if cfg.fused:
        summary.update(objective="fused", fusion=state.best_fusion)
    if run.ranks.is_main:
        (out_dir / "config.json").write_text(lora_cfg.model_dump_json(indent=2))
        (out_dir / "train.json").write_text(json.dumps(summary, indent=2))
        clear_state(out_dir)
    run.ranks.barrier()
    return summary
