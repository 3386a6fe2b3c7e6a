"""Few2Many: train meta-LoRAs and gates on a small sample, with the frozen CRM's user vectors.

The same loop trains the ReLLa-style baseline (one shared LoRA: ``n_meta = 1``, no gate). The loss
is the causal-LM loss on the answer token only (full-vocabulary cross entropy at the answer
position); checkpoints are selected on validation AUC, never on test.
"""

from __future__ import annotations

import json
import math
import time
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
from training.llm.scoring import answer_hidden, pad_right, score_sequences
from training.crm.checkpoint import load_checkpoint
from training.crm.dataset import encode_samples
from training.crm.train import seed_everything
from training.data.samples import PreparedData
from training.llm.prompts import View, prompt_config_for, sample_prompts
from training.metrics import binary_metrics


@dataclass
class LLMTrainConfig:
    n_samples: int = 2048
    k_text: int = 10
    mixed: bool = True  # ReiT: recent-K and semantic views of every sample
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 4
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
    enc = encode_samples(data, samples, space, config, torch.from_numpy(np.asarray(embeddings, np.float32)), progress=False)
    return torch.cat([crm.user_representation(enc.batch(idx)[0]) for idx in torch.arange(len(enc)).split(4096)])


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


def train_llm(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, out_dir: Path,
              cfg: LLMTrainConfig) -> dict:
    """Train, keep the best validation checkpoint in ``out_dir``; returns the training summary."""
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_cfg = PersonalizedLoRAConfig(**cfg.lora)
    model, tokenizer = load_base(base_dir, cfg.dtype, cfg.device)
    lora = PersonalizedLoRA(model, lora_cfg).to(model.device)
    prompt = prompt_config_for(data.meta)  # the dataset names its items ("movie", "book", ...)
    scorer = LLMScorer(model, tokenizer, lora, cfg.k_text, prompt)

    train = data.split("train").sample(n=min(cfg.n_samples, len(data.split("train"))), random_state=cfg.seed)
    valid = data.split("valid").sample(n=min(cfg.valid_samples, len(data.split("valid"))), random_state=cfg.seed)
    train_reps = user_representations(data, train, crm_dir, embeddings)
    valid_reps = user_representations(data, valid, crm_dir, embeddings)
    views: list[View] = ["recent", "semantic"] if cfg.mixed else ["semantic"]
    prompts, labels, reps = [], [], []
    for view in views:
        prompts += scorer.prompts(data, train, embeddings, view)
        labels += train["label"].tolist()
        reps.append(train_reps)
    reps_t = torch.cat(reps).to(model.device)
    valid_prompts = scorer.prompts(data, valid, embeddings, "semantic")
    answer = torch.tensor([scorer.builder.yes_id if y else scorer.builder.no_id for y in labels], device=model.device)

    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(prompts) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(total_steps - warmup, 1))))
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_every = max(1, steps_per_epoch // max(cfg.evals_per_epoch, 1))
    history, best_auc, step, start = [], -1.0, 0, time.perf_counter()
    output = model.get_output_embeddings()

    def evaluate() -> float:
        probs = scorer.score(valid_prompts, valid_reps)
        auc = binary_metrics(valid["label"].to_numpy(), probs)["auc"]
        return auc

    bar = tqdm(total=total_steps, desc="llm train", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(prompts), generator=generator)
        running, tokens, seen = 0.0, 0, 0
        for begin in range(0, len(order), cfg.batch_size * cfg.grad_accum):
            lora.train()
            big = order[begin : begin + cfg.batch_size * cfg.grad_accum]
            for rows in big.split(cfg.batch_size):
                rows_l = rows.tolist()
                ids, mask, last = (t.to(model.device) for t in pad_right([prompts[i] for i in rows_l], scorer.pad_id))
                with lora.user(reps_t[rows.to(model.device)]):
                    hidden = answer_hidden(model, ids, mask, last)
                logits = hidden.float() @ output.weight.float().T
                loss = torch.nn.functional.cross_entropy(logits, answer[rows.to(model.device)]) * len(rows) / len(big)
                loss.backward()
                running += float(loss.detach()) * len(big)
                seen += len(rows)
                tokens += int(mask.sum())
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{running / max(seen, 1):.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            if step % eval_every == 0 or step == total_steps:
                auc = evaluate()
                history.append({"step": step, "epoch": epoch + 1, "train_loss": running / max(seen, 1),
                                "valid_auc": auc, "seconds": time.perf_counter() - start})
                if cfg.progress:
                    tqdm.write(f"step {step}: loss {running / max(seen, 1):.4f}, valid AUC {auc:.4f}")
                if auc > best_auc:
                    best_auc = auc
                    save_file({k: v.detach().cpu().contiguous() for k, v in lora.trainable_state_dict().items()},
                              out_dir / "weights.safetensors")
    bar.close()
    summary = {"config": asdict(cfg), "lora": lora_cfg.model_dump(), "prompt": prompt.model_dump(),
               "best_valid_auc": best_auc, "history": history, "train_seconds": time.perf_counter() - start,
               "instances": len(prompts)}
    (out_dir / "config.json").write_text(lora_cfg.model_dump_json(indent=2))
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2))
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
