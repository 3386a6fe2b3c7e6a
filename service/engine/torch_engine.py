"""The embedded scoring engine: one prefix forward, then all candidate suffixes on its KV cache.

A request's candidates share the prompt prefix (chat header, profile, instructions), so the prefix
is computed once and its keys/values are broadcast to every suffix row instead of recomputed.
Only the answer position of each row is projected, onto the two label rows of the output
embedding, in float32 (bfloat16 logits would quantize the probabilities).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots
from service.llm.scoring import pad_right


class TorchEngine:
    def __init__(self, model, *, yes_id: int, no_id: int, pad_id: int, target_modules: list[str],
                 max_batch: int = 64) -> None:
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.label_rows = model.get_output_embeddings().weight[[yes_id, no_id]].detach().float()
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.slots = LoRASlots(model, target_modules)
        self._lock = threading.Lock()  # one forward at a time: the installed adapter is per forward

    @torch.inference_mode()
    def score(self, adapter: UserAdapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        if any(len(s) == 0 for s in suffixes):
            raise ValueError("every candidate suffix needs at least one token")
        with self._lock:
            self.slots.install(adapter)
            try:
                return np.concatenate([
                    self._score_chunk(prefix, suffixes[i : i + self.max_batch])
                    for i in range(0, len(suffixes), self.max_batch)
                ])
            finally:
                self.slots.install(None)

    def _prefix_cache(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = torch.as_tensor([list(prefix)], dtype=torch.long)
        out = self.decoder(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _score_chunk(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        n, p = len(suffixes), len(prefix)
        ids, mask, last = pad_right(suffixes, self.pad_id)
        if p:
            kv = self._prefix_cache(prefix)
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
            mask = torch.cat([torch.ones(n, p, dtype=mask.dtype), mask], 1)
        else:
            cache = None
        positions = (p + torch.arange(ids.shape[1])).unsqueeze(0).expand(n, -1)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=cache is not None).last_hidden_state
        h = hidden[torch.arange(n), last].float()
        logits = h @ self.label_rows.T
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).numpy()
