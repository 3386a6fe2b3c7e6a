"""Personalized LoRA (RecLoRA): per-user adapters mixed from shared meta-LoRAs by a gate.

For every target module (q and v projections) of every layer there is a bank of ``n_meta``
meta-LoRAs (A_k: d_in x r, B_k: r x d_out) and a gate that reads the CRM's user representation:

    alpha = softmax(gate(h_u) / T)            gate = LayerNorm, Linear, ReLU, Dropout, Linear
    A_u = sum_k alpha_k A_k,  B_u = sum_k alpha_k B_k     (mixed separately, as the authors' code)
    y = W0 x + (lora_alpha / r) * (x A_u) B_u

A_u and B_u form an ordinary rank-r LoRA, so ``materialize`` turns a user into a standard PEFT
adapter that peft and vLLM load unchanged. With ``n_meta = 1`` and no gate the same module is a
single shared LoRA (the ReLLa-style baseline).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class PersonalizedLoRAConfig(BaseModel):
    """Stored in the bundle (lora/config.json) next to the meta-LoRA and gate weights."""

    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = Field(default=8, ge=1)
    lora_alpha: float = 16.0
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    n_meta: int = Field(default=8, ge=1)
    gated: bool = True
    user_dim: int = Field(default=64, ge=1)
    gate_hidden: int = Field(default=60, ge=1)
    gate_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    temperature: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _shared_needs_one(self) -> "PersonalizedLoRAConfig":
        if not self.gated and self.n_meta != 1:
            raise ValueError("an ungated (shared) LoRA has exactly one meta-LoRA: set n_meta = 1")
        return self

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class Gate(nn.Module):
    def __init__(self, cfg: PersonalizedLoRAConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.user_dim), nn.Linear(cfg.user_dim, cfg.gate_hidden), nn.ReLU(),
            nn.Dropout(cfg.gate_dropout), nn.Linear(cfg.gate_hidden, cfg.n_meta),
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                nn.init.zeros_(layer.bias)

    def forward(self, user_rep: torch.Tensor) -> torch.Tensor:
        return self.net(user_rep)


class _UserState:
    """The user representations of the current batch, shared by every wrapped layer; with
    ``segments``, the token counts of the instances packed along one row's sequence axis (one
    representation per segment) instead of one per batch row."""

    def __init__(self) -> None:
        self.user_rep: torch.Tensor | None = None
        self.segments: tuple[int, ...] | None = None


class PersonalizedLoRALinear(nn.Module):
    """A frozen base Linear plus a bank of meta-LoRAs mixed per batch row by its gate."""

    def __init__(self, base: nn.Linear, cfg: PersonalizedLoRAConfig, state: _UserState) -> None:
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.state = state
        self.lora_A = nn.Parameter(torch.empty(cfg.n_meta, base.in_features, cfg.r))
        self.lora_B = nn.Parameter(torch.zeros(cfg.n_meta, cfg.r, base.out_features))
        for k in range(cfg.n_meta):  # as nn.Linear / peft: kaiming-uniform A, zero B (delta W = 0)
            nn.init.kaiming_uniform_(self.lora_A.data[k].T, a=math.sqrt(5))
        self.gate = Gate(cfg) if cfg.gated else None
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout else nn.Identity()

    def mixture(self, user_rep: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(batch, n_meta) mixture weights alpha."""
        if self.gate is None:
            return torch.ones(batch, 1, dtype=self.lora_A.dtype, device=self.lora_A.device)
        if user_rep is None:
            raise RuntimeError("personalized LoRA needs a user representation: use PersonalizedLoRA.user(...)")
        logits = self.gate(user_rep.to(self.lora_A.dtype)) / self.cfg.temperature
        return torch.softmax(logits, dim=-1).expand(batch, -1) if logits.shape[0] == 1 else torch.softmax(logits, -1)

    def user_weights(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A_u (B, d_in, r) and B_u (B, r, d_out) for mixture weights alpha (B, n_meta)."""
        return torch.einsum("bk,kir->bir", alpha, self.lora_A), torch.einsum("bk,kro->bro", alpha, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.segments is not None:
            return self._forward_segments(x, self.state.segments)
        out = self.base(x)
        alpha = self.mixture(self.state.user_rep, x.shape[0])
        a, b = self.user_weights(alpha)
        h = self.dropout(x).to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(h, a), b) * self.cfg.scaling
        return out + delta.reshape(*x.shape[:-1], -1).to(out.dtype)

    def _forward_segments(self, x: torch.Tensor, segments: tuple[int, ...]) -> torch.Tensor:
        """One packed row (1, T, d_in): each segment of tokens through its own user's adapter, in
        the adapter's dtype as the batched path; the scaling is folded into the small B_u."""
        if x.shape[0] != 1 or sum(segments) != x.shape[1]:
            raise ValueError(f"packed segments {sum(segments)} tokens, input {tuple(x.shape[:-1])}: expected one row")
        out = self.base(x)
        a, b = self.user_weights(self.mixture(self.state.user_rep, len(segments)))
        b = b * self.cfg.scaling
        h = self.dropout(x).to(a.dtype)[0]
        if self.gate is None:  # one shared adapter: all tokens at once
            delta = h @ a[0] @ b[0]
        else:
            delta = torch.cat([part @ a[i] @ b[i] for i, part in enumerate(h.split(list(segments)))])
        return out + delta.unsqueeze(0).to(out.dtype)


class PersonalizedLoRA(nn.Module):
    """Installs personalized LoRA layers into a causal LM and owns their parameters."""

    def __init__(self, model: nn.Module, cfg: PersonalizedLoRAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._state = _UserState()
        self._model = [model]  # not a submodule: its weights are not ours to save
        layers: dict[str, PersonalizedLoRALinear] = {}
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in cfg.target_modules and isinstance(module, nn.Linear):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                wrapped = PersonalizedLoRALinear(module, cfg, self._state)
                setattr(parent, leaf, wrapped)
                layers[name] = wrapped
        if not layers:
            raise ValueError(f"no nn.Linear named {cfg.target_modules} in the model")
        for p in model.parameters():
            p.requires_grad_(False)
        self.module_names = list(layers)
        self.layers = nn.ModuleDict({n.replace(".", "__"): m for n, m in layers.items()})
        for m in self.layers.values():
            for p in [m.lora_A, m.lora_B, *(m.gate.parameters() if m.gate is not None else [])]:
                p.requires_grad_(True)

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Meta-LoRAs and gates only (what a bundle stores), keyed by module path."""
        out = {}
        for name, layer in zip(self.module_names, self.layers.values()):
            for key, tensor in layer.state_dict().items():
                if not key.startswith("base."):
                    out[f"{name}.{key}"] = tensor
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"personalized LoRA weights do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, layer in zip(self.module_names, self.layers.values()):
            own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
            for key, current in own.items():
                value = state[f"{name}.{key}"]
                if value.shape != current.shape:
                    raise ValueError(f"{name}.{key}: shape {tuple(value.shape)}, expected {tuple(current.shape)}")
                current.copy_(value)

    @contextmanager
    def user(self, user_rep: torch.Tensor | None, segments: Sequence[int] | None = None) -> Iterator[None]:
        """Run forwards for users with these representations ((B, user_dim) or (1, user_dim)).

        ``segments``: the inputs are one row (1, T) of packed instances of these token counts,
        instance i's tokens read ``user_rep[i]`` (or the one shared row)."""
        state = self._state
        previous = state.user_rep, state.segments
        state.user_rep, state.segments = user_rep, None if segments is None else tuple(int(n) for n in segments)
        try:
            yield
        finally:
            state.user_rep, state.segments = previous

    @torch.no_grad()
    def user_adapter(self, user_rep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """PEFT-format LoRA weights for one user (user_rep: (user_dim,) or (1, user_dim))."""
        rep = None if user_rep is None else user_rep.reshape(1, -1)
        mixed = {}
        for name, layer in zip(self.module_names, self.layers.values()):
            a, b = layer.user_weights(layer.mixture(rep, 1))
            mixed[name] = (a[0], b[0])
        return peft_weights(mixed)

    def adapter_config(self, base_model_name_or_path: str) -> dict:
        """adapter_config.json content for ``materialize``; built by peft so peft and vLLM agree."""
        from peft import LoraConfig

        cfg = LoraConfig(r=self.cfg.r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                         target_modules=sorted(self.cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                         base_model_name_or_path=base_model_name_or_path)
        return json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    def materialize(self, user_rep: torch.Tensor | None, out_dir: str | Path, base_model_name_or_path: str,
                    dtype: torch.dtype = torch.float32) -> Path:
        """Write one user's adapter as a standard PEFT adapter directory."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype) for k, v in self.user_adapter(user_rep).items()}, out / ADAPTER_WEIGHTS)
        (out / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(base_model_name_or_path), indent=2))
        return out


def peft_weights(mixed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT state-dict keys for per-module (A_u: d_in x r, B_u: r x d_out)."""
    weights = {}
    for name, (a, b) in mixed.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous()  # (r, d_in)
        weights[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous()  # (d_out, r)
    return weights


def from_peft_weights(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A: d_in x r, B: r x d_out) from PEFT state-dict keys: ``peft_weights`` undone."""
    prefix, a_suffix, b_suffix = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
    modules = sorted(k[len(prefix):-len(a_suffix)] for k in weights if k.startswith(prefix) and k.endswith(a_suffix))
    return {m: (weights[f"{prefix}{m}{a_suffix}"].T.contiguous(), weights[f"{prefix}{m}{b_suffix}"].T.contiguous())
            for m in modules}


def peft_config(rank: int, scaling: float, target_modules: list[str], base_model: str) -> dict:
    """adapter_config.json of a mixed adapter (a plain rank-r LoRA) as peft and vLLM read it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": scaling * rank, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(target_modules), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "inference_mode": True}


class AdapterMixer(nn.Module):
    """The serving side of personalized LoRA: gates and meta-LoRA banks without a base model.

    Built from the trained state dict, it turns a user representation into mixture weights
    and the user's rank-r adapter; the runtime caches and installs the result.
    """

    def __init__(self, cfg: PersonalizedLoRAConfig, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.module_names = sorted({k.rsplit(".lora_A", 1)[0] for k in state if k.endswith(".lora_A")})
        if not self.module_names:
            raise ValueError("no meta-LoRA banks in the personalized LoRA weights")
        self.banks_a = nn.ParameterList()
        self.banks_b = nn.ParameterList()
        self.gates = nn.ModuleList()
        for name in self.module_names:
            a, b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            if a.shape[0] != cfg.n_meta or a.shape[2] != cfg.r or b.shape[:2] != (cfg.n_meta, cfg.r):
                raise ValueError(f"{name}: meta-LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not match the config")
            self.banks_a.append(nn.Parameter(a.float().clone(), requires_grad=False))
            self.banks_b.append(nn.Parameter(b.float().clone(), requires_grad=False))
            if cfg.gated:
                gate = Gate(cfg)
                gate.load_state_dict({k.split(f"{name}.gate.", 1)[1]: v for k, v in state.items()
                                      if k.startswith(f"{name}.gate.")}, strict=True)
                self.gates.append(gate.eval())
        self.eval()

    @torch.no_grad()
    def mixtures(self, user_rep: torch.Tensor | None) -> torch.Tensor:
        """(n_modules, n_meta) alpha of one user; all ones for a shared LoRA."""
        if not self.cfg.gated:
            return torch.ones(len(self.module_names), 1)
        if user_rep is None:
            raise ValueError("a gated adapter needs a user representation")
        return self.gate_outputs(user_rep.reshape(1, -1))[0]

    @torch.no_grad()
    def gate_outputs(self, user_reps: torch.Tensor) -> torch.Tensor:
        """(N, n_modules, n_meta) alpha of N users (user_reps: (N, user_dim)); what ``mixtures``
        gives one user, for many at once (the export clusters them)."""
        if not self.cfg.gated:
            return torch.ones(len(user_reps), len(self.module_names), 1)
        if not hasattr(self, "_stacked"):
            self._stack_gates()
        ln_w, ln_b, w1, b1, w2, b2 = self._stacked
        rep = torch.nn.functional.layer_norm(user_reps.float(), (self.cfg.user_dim,))
        h = rep[:, None, :] * ln_w + ln_b  # (N, M, user_dim): every module's gate at once
        h = torch.relu(torch.einsum("nmd,mhd->nmh", h, w1) + b1)
        return torch.softmax((torch.einsum("nmh,mkh->nmk", h, w2) + b2) / self.cfg.temperature, -1)

    def _stack_gates(self) -> None:
        """One batched gate for all modules: the per-module loop costs more than the arithmetic."""
        nets = [g.net for g in self.gates]
        self._stacked = tuple(torch.stack([getattr(net[i], name) for net in nets]).detach()
                              for i, name in ((0, "weight"), (0, "bias"), (1, "weight"), (1, "bias"),
                                              (4, "weight"), (4, "bias")))

    @torch.no_grad()
    def adapter(self, alphas: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (A_u: d_in x r, B_u: r x d_out) for mixture weights from ``mixtures``."""
        if not hasattr(self, "_banks"):
            self._banks = self._group_banks()
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, a_bank, b_bank in self._banks:  # one batched contraction per shape group
            alpha = alphas[index]
            a_mixed = torch.einsum("mk,mkir->mir", alpha, a_bank)
            b_mixed = torch.einsum("mk,mkro->mro", alpha, b_bank)
            for j, m in enumerate(index.tolist()):
                out[self.module_names[m]] = (a_mixed[j], b_mixed[j])
        return out

    def _group_banks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        groups: dict[tuple, list[int]] = {}
        for m, (a, b) in enumerate(zip(self.banks_a, self.banks_b)):
            groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(m)
        return [(torch.tensor(idx), torch.stack([self.banks_a[m] for m in idx]), torch.stack([self.banks_b[m] for m in idx]))
                for idx in groups.values()]
