"""Few2Many: train meta-LoRAs and gates on a small sample, with the frozen CRM's user vectors.

The same loop trains the ReLLa-style baseline (one shared LoRA: ``n_meta = 1``, no gate). Two
objectives: ``answer`` (the causal-LM loss on the answer token only: full-vocabulary cross entropy
at the answer position) and ``fused`` (binary cross entropy of w * CRM logit + (logit_Yes -
logit_No) + b, w and b learned: the LLM learns what the frozen CRM misses, and serving's fusion
applies the result unchanged). Checkpoints are selected on validation AUC (the fused AUC for the
fused objective), never on test.

Prompts are tokenized once per run. Micro-batches are packed by default (``training.llm.packing``:
one padding-free row per micro-batch, attention kept within each instance); ``packing=False``
runs right-padded rows instead. An optimizer step covers ``batch_size * grad_accum`` instances
either way; ``pack_tokens`` only changes how a step's instances are split into forwards.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from service.llm.personalized_lora import PersonalizedLoRA, PersonalizedLoRAConfig
from service.llm.precision import resolve_dtype
from service.llm.prompt import PromptBuilder, PromptConfig
from service.model.fusion import FUSION_FILE, Fusion, logit
from training.llm.packing import pack, packed_answer_hidden, token_budget_groups
from training.llm.scoring import answer_hidden, label_logits, pad_right, score_sequences
from training.crm.checkpoint import load_checkpoint, load_user_knowledge
from training.crm.dataset import encode_samples
from training.crm.train import predict, seed_everything
from training.data.samples import PreparedData
from training.llm.prompts import View, prompt_config_for, sample_prompts
from training.llm.resume import RESUME_DIR, Progress, clear_state, load_state, restore, save_state
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

    def changed_from(self, recorded: dict) -> list[str]:
        """The settings that differ from ``recorded`` (an earlier run's ``asdict`` as JSON); showing
        progress bars or not is no setting of the run."""
        return sorted(k for k, v in asdict(self).items()
                      if k != "progress" and json.loads(json.dumps(v)) != recorded.get(k))

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


def resolve_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def load_base(base_dir: str | Path, dtype: str, device: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=resolve_dtype(dtype, target)).eval()
    return model.to(target), tokenizer


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def user_representations(data: PreparedData, samples: pd.DataFrame, crm_dir: Path, embeddings: np.ndarray) -> torch.Tensor:
    """(N, user_dim) frozen CRM user vectors for the samples."""
    crm, config, space = load_checkpoint(crm_dir, data.items, embeddings)
    enc = encode_samples(data, samples, space, config, torch.from_numpy(np.asarray(embeddings, np.float32)), progress=False,
                         user_knowledge=load_user_knowledge(crm_dir))
    return torch.cat([crm.user_representation(enc.batch(idx)[0]) for idx in torch.arange(len(enc)).split(4096)])


def crm_probabilities(data: PreparedData, samples: pd.DataFrame, crm_dir: Path, embeddings: np.ndarray) -> np.ndarray:
    """(N,) the frozen CRM's P(like) of the samples."""
    crm, config, space = load_checkpoint(crm_dir, data.items, embeddings)
    enc = encode_samples(data, samples, space, config, torch.from_numpy(np.asarray(embeddings, np.float32)), progress=False,
                         user_knowledge=load_user_knowledge(crm_dir))
    return predict(crm, enc)


class LLMScorer:
    """Base model + optional (personalized) LoRA + prompt builder: scores dataset samples.

    ``prompt`` is the wording the LoRA was trained with; None words each dataset's prompts as its
    ``meta.json`` says (``prompt_config_for``).
    """

    def __init__(self, model, tokenizer, lora: PersonalizedLoRA | None, k_text: int,
                 prompt: PromptConfig | None = None) -> None:
        self.model, self.tokenizer, self.lora, self.k_text = model, tokenizer, lora, k_text
        self.prompt = prompt
        self.builder = PromptBuilder(tokenizer, prompt or PromptConfig())
        self.pad_id = pad_id_of(tokenizer)

    def builder_for(self, data: PreparedData) -> PromptBuilder:
        """The builder of ``data``'s prompts (this scorer's own wording when it has one)."""
        config = self.prompt or prompt_config_for(data.meta)
        if config.version != self.builder.config.version:  # the version names the words
            self.builder = PromptBuilder(self.tokenizer, config)
        return self.builder

    def prompts(self, data: PreparedData, samples: pd.DataFrame, embeddings: np.ndarray, view: View) -> list[list[int]]:
        return sample_prompts(data, samples, self.builder_for(data), embeddings, self.k_text, view)

    def score(self, prompts: list[list[int]], user_reps: torch.Tensor | None, batch_size: int = 16) -> np.ndarray:
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows: self.lora.user(None if reps is None else reps[rows])  # noqa: E731
        self.model.eval()
        if self.lora is not None:
            self.lora.eval()
        return score_sequences(self.model, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               batch_size, rows_context=ctx).numpy()


# ---- the training step: instances, objectives, micro-batches ----------------------------------------


@dataclass
class TrainSet:
    """Training instances, tokenized once per run, with what the objectives need of each."""

    tokens: list[torch.Tensor]  # (L_i,) token ids of each prompt, on the model's device
    reps: torch.Tensor  # (N, user_dim) frozen CRM user vectors
    labels: torch.Tensor  # (N,) 1.0 / 0.0
    answers: torch.Tensor  # (N,) the answer token: yes_id or no_id
    crm_logits: torch.Tensor | None = None  # (N,) the frozen CRM's logits (fused objective)

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], reps: torch.Tensor, labels: Sequence[int], yes_id: int,
              no_id: int, device: torch.device, crm_logits: torch.Tensor | None = None) -> "TrainSet":
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32), device=device)
        return cls(tokens=[torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts], reps=reps.to(device),
                   labels=y, answers=torch.where(y > 0, yes_id, no_id).long(),
                   crm_logits=None if crm_logits is None else crm_logits.to(device))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        return [int(t.numel()) for t in self.tokens]


class AnswerLoss(torch.nn.Module):
    """Full-vocabulary cross entropy of the answer token at the answer position, in float32; the
    frozen output embedding is converted to float32 once per run, not per micro-batch."""

    def __init__(self, model) -> None:
        super().__init__()
        self._weight = model.get_output_embeddings().weight.detach().float()

    def forward(self, hidden: torch.Tensor, data: TrainSet, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(hidden.float() @ self._weight.T, data.answers[rows])


class FusedLoss(torch.nn.Module):
    """Binary cross entropy of w * CRM logit + (logit_Yes - logit_No) + b: the LLM's logit is
    logit(P(Yes)) of a softmax over [Yes, No], so ``fusion()`` is serving's Fusion (w_llm = 1)."""

    def __init__(self, model, yes_id: int, no_id: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), device=model.device))
        self.b = torch.nn.Parameter(torch.zeros((), device=model.device))
        self._model = [model]  # not a submodule: its weights are not ours to train or save
        self.label_ids = [yes_id, no_id]

    def llm_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = label_logits(self._model[0], hidden, self.label_ids)
        return logits[:, 0] - logits[:, 1]

    def forward(self, hidden: torch.Tensor, data: TrainSet, rows: torch.Tensor) -> torch.Tensor:
        fused = self.w * data.crm_logits[rows] + self.llm_logit(hidden) + self.b
        return torch.nn.functional.binary_cross_entropy_with_logits(fused, data.labels[rows])

    def fusion(self) -> Fusion:
        return Fusion(w_llm=1.0, w_crm=float(self.w.detach()), bias=float(self.b.detach()))


def micro_batches(rows: Sequence[int], lengths: Sequence[int], cfg: LLMTrainConfig) -> list[list[int]]:
    """One optimizer step's instances split into forwards: by token budget when packing with
    ``pack_tokens``, else ``batch_size`` instances each."""
    if cfg.packing and cfg.pack_tokens:
        return token_budget_groups(rows, lengths, cfg.pack_tokens)
    return [list(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]


def micro_batch_hidden(model, lora: PersonalizedLoRA, data: TrainSet, micro: list[int], packing: bool,
                       pad_id: int) -> torch.Tensor:
    """(len(micro), hidden) answer-position hidden states, each instance with its own user."""
    rows = torch.as_tensor(micro, device=data.reps.device)
    if packing:
        batch = pack([data.tokens[i] for i in micro])
        with lora.user(data.reps[rows], segments=batch.lengths):
            return packed_answer_hidden(model, batch)
    ids, mask, last = (t.to(model.device) for t in pad_right([data.tokens[i] for i in micro], pad_id))
    with lora.user(data.reps[rows]):
        return answer_hidden(model, ids, mask, last)


def accumulate_step(model, lora: PersonalizedLoRA, loss_fn: torch.nn.Module, data: TrainSet, rows: Sequence[int],
                    cfg: LLMTrainConfig, pad_id: int) -> tuple[float, int]:
    """Forward and backward of one optimizer step's instances (gradients accumulate, the loss is
    their mean); returns (summed instance loss, tokens)."""
    total, tokens = 0.0, 0
    lengths = data.lengths
    for micro in micro_batches(list(rows), lengths, cfg):
        hidden = micro_batch_hidden(model, lora, data, micro, cfg.packing, pad_id)
        loss = loss_fn(hidden, data, torch.as_tensor(micro, device=hidden.device)) * len(micro) / len(rows)
        loss.backward()
        total += float(loss.detach()) * len(rows)
        tokens += sum(lengths[i] for i in micro)
    return total, tokens


def train_llm(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, out_dir: Path,
              cfg: LLMTrainConfig, *, checkpoint_every: int = 8, stop_after_steps: int | None = None,
              stop_after_seconds: float | None = None) -> dict:
    """Train, keep the best validation checkpoint in ``out_dir``; returns the training summary.

    Every ``checkpoint_every`` optimizer steps (0: never) the mid-run state goes to ``out_dir/resume``
    (``training.llm.resume``); a call that finds one continues from it (one left by other settings
    is refused), so a run longer than one sitting can be stopped and continued; a killed run loses
    at most ``checkpoint_every`` steps. ``stop_after_steps`` (or ``stop_after_seconds``) ends this
    call after that many of its steps (or once a step ends past that time), with the state saved:
    its summary says ``finished: False`` and no ``train.json`` is written."""
    cfg.check()
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_cfg = PersonalizedLoRAConfig(**cfg.lora)
    model, tokenizer = load_base(base_dir, cfg.dtype, cfg.device)
    lora = PersonalizedLoRA(model, lora_cfg).to(model.device)
    prompt = prompt_config_for(data.meta)  # the dataset names its items ("movie", "book", ...)
    scorer = LLMScorer(model, tokenizer, lora, cfg.k_text, prompt)
    fused = cfg.objective == "fused"

    train = data.split("train").sample(n=min(cfg.n_samples, len(data.split("train"))), random_state=cfg.seed)
    valid = data.split("valid").sample(n=min(cfg.valid_samples, len(data.split("valid"))), random_state=cfg.seed)
    train_reps = user_representations(data, train, crm_dir, embeddings)
    valid_reps = user_representations(data, valid, crm_dir, embeddings)
    views: list[View] = ["recent", "semantic"] if cfg.mixed else ["semantic"]
    prompts, labels = [], []
    for view in views:
        prompts += scorer.prompts(data, train, embeddings, view)
        labels += train["label"].tolist()
    crm_logits, valid_crm = None, None
    if fused:
        crm_logits = torch.from_numpy(logit(crm_probabilities(data, train, crm_dir, embeddings))).float()
        crm_logits = crm_logits.repeat(len(views))
        valid_crm = crm_probabilities(data, valid, crm_dir, embeddings)
    instances = TrainSet.build(prompts, torch.cat([train_reps] * len(views)), labels, scorer.builder.yes_id,
                               scorer.builder.no_id, model.device, crm_logits)
    valid_prompts = scorer.prompts(data, valid, embeddings, "semantic")
    loss_fn = FusedLoss(model, scorer.builder.yes_id, scorer.builder.no_id) if fused else AnswerLoss(model)

    params = [p for p in lora.parameters() if p.requires_grad]
    groups: list[dict] = [{"params": params}]
    if fused:
        groups.append({"params": list(loss_fn.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step_size = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(instances) / step_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(total_steps - warmup, 1))))
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_every = max(1, steps_per_epoch // max(cfg.evals_per_epoch, 1))
    extra_params = dict(loss_fn.named_parameters())  # the fused objective's w and b
    progress, order = Progress(), None
    kept = load_state(out_dir)
    if kept is not None:
        progress, meta, tensors = kept
        changed = cfg.changed_from(meta["config"])
        if changed:
            raise ValueError(f"{out_dir} holds a stopped run with other settings ({', '.join(changed)}): train "
                             f"into another directory, or delete {out_dir / RESUME_DIR} to start over")
        weights, extra, order = restore(meta, tensors, optimizer, schedule, generator)
        lora.load_trainable_state_dict(weights)
        with torch.no_grad():
            for name, value in extra.items():
                extra_params[name].copy_(value)
        if cfg.progress:
            tqdm.write(f"resuming {out_dir} at step {progress.step} of {total_steps}")
    best_fusion = Fusion.from_json(progress.best_fusion) if progress.best_fusion else None
    history, best_auc, step = progress.history, progress.best_auc, progress.step
    start = time.perf_counter() - progress.seconds
    call_start = time.perf_counter()

    def checkpoint(epoch: int, position: int, running: float, tokens: int, seen: int) -> None:
        state = Progress(step=step, epoch=epoch, position=position, running=running, tokens=tokens, seen=seen,
                         seconds=time.perf_counter() - start, best_auc=best_auc, history=history,
                         best_fusion=best_fusion.to_json() if best_fusion else None)
        save_state(out_dir, asdict(cfg), state, order, lora.trainable_state_dict(), optimizer, schedule,
                   extra_params, generator)

    def evaluate() -> dict:
        probs = scorer.score(valid_prompts, valid_reps)
        auc = binary_metrics(valid["label"].to_numpy(), probs)["auc"]
        if not fused:
            return {"valid_auc": auc}
        fused_auc = binary_metrics(valid["label"].to_numpy(), loss_fn.fusion()(probs, valid_crm))["auc"]
        return {"valid_auc": fused_auc, "valid_llm_auc": auc, "fusion": loss_fn.fusion().to_json()}

    bar = tqdm(total=total_steps, initial=step, desc="llm train", disable=not cfg.progress)
    for epoch in range(progress.epoch, cfg.epochs):
        if order is not None and epoch == progress.epoch:  # the epoch the stopped run was in
            first, running, tokens, seen = progress.position, progress.running, progress.tokens, progress.seen
        else:
            order = torch.randperm(len(instances), generator=generator).tolist()
            first, running, tokens, seen = 0, 0.0, 0, 0
        for begin in range(first, len(order), step_size):
            lora.train()
            big = order[begin : begin + step_size]
            loss_sum, n_tokens = accumulate_step(model, lora, loss_fn, instances, big, cfg, scorer.pad_id)
            running += loss_sum
            seen += len(big)
            tokens += n_tokens
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{running / max(seen, 1):.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            if step % eval_every == 0 or step == total_steps:
                result = evaluate()
                auc = result["valid_auc"]
                history.append({"step": step, "epoch": epoch + 1, "train_loss": running / max(seen, 1), **result,
                                "seconds": time.perf_counter() - start})
                if cfg.progress:
                    tqdm.write(f"step {step}: loss {running / max(seen, 1):.4f}, valid AUC {auc:.4f}"
                               + (f" (fused; LLM alone {result['valid_llm_auc']:.4f})" if fused else ""))
                if auc > best_auc:
                    best_auc = auc
                    save_file({k: v.detach().cpu().contiguous() for k, v in lora.trainable_state_dict().items()},
                              out_dir / "weights.safetensors")
                    if fused:
                        best_fusion = loss_fn.fusion()
                        (out_dir / FUSION_FILE).write_text(json.dumps(best_fusion.to_json(), indent=2))
            stopping = step < total_steps and (
                (stop_after_steps is not None and step - progress.step >= stop_after_steps)
                or (stop_after_seconds is not None and time.perf_counter() - call_start >= stop_after_seconds))
            if stopping or (checkpoint_every and step % checkpoint_every == 0 and step < total_steps):
                checkpoint(epoch, begin + step_size, running, tokens, seen)
            if stopping:
                bar.close()
                return {"finished": False, "step": step, "total_steps": total_steps, "best_valid_auc": best_auc,
                        "history": history, "train_seconds": time.perf_counter() - start,
                        "instances": len(instances)}
    bar.close()
    summary = {"config": asdict(cfg), "lora": lora_cfg.model_dump(), "prompt": prompt.model_dump(),
               "best_valid_auc": best_auc, "history": history, "train_seconds": time.perf_counter() - start,
               "instances": len(instances)}
    if fused:
        summary.update(objective="fused", fusion=best_fusion.to_json() if best_fusion else None)
    (out_dir / "config.json").write_text(lora_cfg.model_dump_json(indent=2))
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2))
    clear_state(out_dir)
    return summary


def load_trained(out_dir: Path, base_dir: Path, dtype: str = "float32", k_text: int = 10,
                 device: str = "auto") -> LLMScorer:
    """A trained LoRA directory as a scorer, worded as it was trained (``train.json``'s prompt)."""
    model, tokenizer = load_base(base_dir, dtype, device)
    lora = PersonalizedLoRA(model, PersonalizedLoRAConfig.model_validate_json((out_dir / "config.json").read_text()))
    lora.load_trainable_state_dict(load_file(out_dir / "weights.safetensors"))
    lora.to(model.device)
    train = out_dir / "train.json"
    prompt = PromptConfig.model_validate(json.loads(train.read_text())["prompt"]) if train.is_file() else None
    return LLMScorer(model, tokenizer, lora, k_text, prompt)
