"""The embedded scoring engine: one prefix forward, then all candidate suffixes on its KV cache.

A request's candidates share the prompt prefix (chat header, profile, instructions), so the prefix
is computed once and its keys/values are broadcast to every suffix row instead of recomputed.
Only the answer position of each row is projected, onto the two label rows of the output
embedding, in float32 (bfloat16 logits would quantize the probabilities).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots
from service.llm.scoring import pad_right


class DeadlineExceeded(TimeoutError):
    """The engine stopped a forward because the request's deadline passed."""


class TorchEngine:
    def __init__(self, model, *, yes_id: int, no_id: int, pad_id: int, target_modules: list[str],
                 max_batch: int = 10) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.decoder = model.get_decoder()
        self.label_rows = model.get_output_embeddings().weight[[yes_id, no_id]].detach().float()
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.slots = LoRASlots(model, target_modules)
        self._lock = threading.Lock()  # one forward at a time: the installed adapter is per forward
        self._deadline: float | None = None
        # A late request is abandoned between layers, so it does not hold the engine (and every
        # request queued behind it) for a forward whose answer nobody will read.
        for layer in self.decoder.layers:
            layer.register_forward_pre_hook(self._check_deadline)

    def _check_deadline(self, module, args) -> None:
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise DeadlineExceeded("the request deadline passed during the LLM forward")

    @torch.inference_mode()
    def score(self, adapter: UserAdapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None) -> np.ndarray:
        """P(Yes) per suffix; ``deadline`` is a ``time.perf_counter()`` instant after which the
        forward stops with DeadlineExceeded."""
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        if any(len(s) == 0 for s in suffixes):
            raise ValueError("every candidate suffix needs at least one token")
        with self._lock:
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineExceeded("the request deadline passed while waiting for the engine")
            self._deadline = deadline
            self.slots.install(adapter)
            try:
                kv = self._prefix_cache(prefix) if prefix else None  # once per request, shared by every chunk
                # Similar lengths share a chunk, so right-padding wastes little work.
                order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
                out = np.empty(len(suffixes), dtype=np.float32)
                for start in range(0, len(order), self.max_batch):
                    rows = order[start : start + self.max_batch]
                    out[rows] = self._score_chunk(kv, len(prefix), [suffixes[i] for i in rows])
                return out
            finally:
                self._deadline = None
                self.slots.install(None)

    def _prefix_cache(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = torch.as_tensor([list(prefix)], dtype=torch.long, device=self.device)
        out = self.decoder(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _score_chunk(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, p: int,
                     suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        n = len(suffixes)
        ids, mask, last = (t.to(self.device) for t in pad_right(suffixes, self.pad_id))
        if kv is not None:
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
            mask = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=self.device), mask], 1)
        else:
            cache = None
        positions = (p + torch.arange(ids.shape[1], device=self.device)).unsqueeze(0).expand(n, -1)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=cache is not None).last_hidden_state
        h = hidden[torch.arange(n, device=self.device), last].float()
        logits = h @ self.label_rows.T
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().numpy()
