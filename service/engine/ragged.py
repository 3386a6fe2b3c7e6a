"""A Llama-family decoder forward over ragged rows: no padding in the projections and the MLP.

transformers runs a batch of candidate suffixes as a right-padded rectangle, so every projection
and MLP matmul also runs on the padding (a tenth of the tokens for a typical request: suffix
lengths differ by title lengths and retrieved history). Here the rows are packed into one
``(tokens, hidden)`` matrix for every matmul, and the rows' shared context (the prompt prefix,
radix-shared runs) is a key/value cache broadcast to every row. On CPUs attention is the native
kernel (``service.engine.native``): every query over its context and its own row's keys up to its
position, on the packed rows, in one call per layer. Elsewhere, or without a compiler, it is
torch's kernels: each row's own keys (causal) on a padded layout and each context as one call for
all its queries, merged by log-sum-exps; torch's CPU flash kernel computes every pair of a causal
row shorter than 512 tokens, twice the useful work, which is what the native kernel saves.

The last layer computes queries, the attention output, ``o_proj`` and the MLP only where a result
is read: each row's answer position when scoring, nowhere when extending the cache (a cache needs
only that layer's keys and values). transformers offers padding-free batches only through CUDA
flash-attention kernels, which is why this forward is written out; it reuses the model's own
weights (norms, projections, LoRA slots, MLP, rotary embedding), so weights and adapters are the
same objects as in the transformers forward, and a test holds the two equal in float32.

Below float32 (bfloat16 weights) only the matmuls run in the model's dtype. The residual stream,
the norms, rotary, attention and the key/value cache stay in float32, as mixed-precision
inference does: a bfloat16 residual stream rounds every layer's update into 8 mantissa bits, which
is most of what separates bfloat16 scores from exact ones, and the float32 elementwise work is
also cheaper here (one fused norm kernel instead of eight bfloat16 passes, no casts per layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from service.engine.native import NativeKernels

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values as (1, kv_heads, length, head_dim)
SUPPORTED_MODEL_TYPES = ("llama",)


def context_length(context: KV | None) -> int:
    """Tokens a cache holds (0 for none)."""
    return 0 if context is None else int(context[0][0].shape[2])


class UnsupportedModel(ValueError):
    """The ragged forward does not know this architecture."""


class RaggedDecoder:
    """The packed forward; ``kernel`` holds the native CPU kernels (``service.engine.native``:
    attention, rotary, the MLP's SiLU product), or None for torch's (and on devices other than CPUs)."""

    def __init__(self, model, kernel: NativeKernels | None = None) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"the embedded engine runs {SUPPORTED_MODEL_TYPES} models, not {config.model_type!r}")
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers[: config.num_hidden_layers])
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.silu = config.hidden_act == "silu"
        self.kernel = kernel
        self.norm_weights = {id(n): n.weight.detach().float().contiguous()  # for the native norm
                             for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)}

    def forward(self, kv: KV | None, p: int, rows: Sequence[Sequence[int]], *, extend: bool = False,
                before_layer: Callable[[], None] | None = None) -> tuple[torch.Tensor | None, KV | None]:
        """Run ``rows`` on one context ``kv`` of length ``p`` (None when p == 0).

        Scoring (``extend`` false) returns the final-norm hidden state at each row's last token,
        ``(rows, hidden)`` in float32. Extending (one row) returns the cache of the context plus
        the row, in float32.
        """
        if extend and len(rows) != 1:
            raise ValueError("the cache is extended by one row at a time")
        if context_length(kv) != p:
            raise ValueError(f"the context holds {context_length(kv)} tokens, not {p}")
        hidden, caches = self.run([Row(r, kv, extend) for r in rows], before_layer=before_layer)
        return (None, caches[0]) if extend else (hidden, None)

    def run(self, rows: Sequence["Row"], *, before_layer: Callable[[], None] | None = None,
            embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, list[KV]]:
        """One packed forward of rows that may each sit on a different context (a radix tree's
        nodes, one level at a time).

        Returns the final-norm hidden state at the last token of every scoring row, ``(rows,
        hidden)`` in float32 (None when every row extends), and for every extending row, in order,
        the cache of its context plus the row. ``before_layer`` is called before every layer
        (deadline checks). ``embeds`` (packed positions, vectors) replace those tokens' input
        embeddings (their ids are read as 0), rounded to the model's dtype as its own rows are.
        """
        embed = self.decoder.embed_tokens.weight
        device, dtype = embed.device, embed.dtype
        layout = _Layout(torch.tensor([len(r.tokens) for r in rows], dtype=torch.long), device)
        contexts = _Contexts(rows, layout, device)
        ids = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long, device=device)
        if embeds is not None:
            at = embeds[0].to(device)
            ids[at] = 0
        h = self.decoder.embed_tokens(ids).float()  # (tokens, hidden): the residual stream
        if embeds is not None:
            h[at] = embeds[1].to(device=device, dtype=dtype).float()
        cos, sin = self.decoder.rotary_emb(h, contexts.positions.unsqueeze(0))
        cos, sin = cos[0, :, None].float(), sin[0, :, None].float()  # (tokens, 1, head_dim)
        extending = [i for i, r in enumerate(rows) if r.extend]
        scoring = [i for i, r in enumerate(rows) if not r.extend]
        caches: dict[int, KV] = {i: [] for i in extending}
        answers = layout.last[scoring] if len(scoring) < len(rows) else layout.last
        native = self.kernel if device.type == "cpu" else None  # a model moved off the CPU uses torch's
        attend = (_NativeAttention(native, layout, contexts, scoring, self.scaling) if native is not None else
                  _TorchAttention(layout, contexts, scoring, self.scaling))
        rope = (_NativeRotary(native, cos, sin) if native is not None and dtype == torch.bfloat16 else
                _TorchRotary(cos, sin))
        fused_norm = native is not None and dtype == torch.bfloat16 and h.shape[1] % 16 == 0
        norm = _NativeNorm(native, self.norm_weights) if fused_norm else _norm
        for index, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer()
            attn = layer.self_attn
            x = norm(layer.input_layernorm, h, dtype)
            k = rope(attn.k_proj(x).view(-1, self.n_kv, self.head_dim))
            v = attn.v_proj(x).float().view(-1, self.n_kv, self.head_dim)
            for i in extending:
                n, context, at = len(rows[i].tokens), rows[i].context, int(layout.starts[i])
                k_i = k[at : at + n].transpose(0, 1).unsqueeze(0).contiguous()
                v_i = v[at : at + n].transpose(0, 1).unsqueeze(0).contiguous()
                caches[i].append((k_i, v_i) if context is None else
                                 (torch.cat([context[index][0], k_i], 2), torch.cat([context[index][1], v_i], 2)))
            final = index == len(self.layers) - 1
            if final and not scoring:
                break  # caches need this layer's keys and values only
            if final:  # queries at the scoring rows' answer positions only
                x, h = x[answers], h[answers]
            q = rope(attn.q_proj(x).view(-1, self.n_heads, self.head_dim), answers if final else None)
            out = attend(q, k, v, index, final)
            # in place: the residual stream is this forward's own tensor, and a new one per add
            # would be a fresh multi-megabyte allocation (page faults included) twice per layer
            h.add_(attn.o_proj(out.reshape(len(out), -1).to(dtype)))
            h.add_(_mlp(layer.mlp, norm(layer.post_attention_layernorm, h, dtype), self.silu, native))
        hidden = _norm(self.decoder.norm, h, torch.float32) if scoring else None
        return hidden, [caches[i] for i in extending]


class _NativeAttention:
    """Attention of a forward's rows by the native kernel: each query over its context and its
    own row's keys (causal) in one call per layer, on the packed layout."""

    def __init__(self, kernel: NativeKernels, layout: "_Layout", contexts: "_Contexts", scoring: list[int],
                 scale: float) -> None:
        self.kernel, self.contexts, self.scale = kernel, contexts, scale
        lengths, starts, of_row = layout.lengths, layout.starts, contexts.of_row
        zeros = torch.zeros_like(lengths)
        # per row: query start, query count, first query's position, key start, context
        self.every = torch.stack([starts, lengths, zeros, starts, of_row], 1).contiguous()
        picked = torch.tensor(scoring, dtype=torch.long)
        self.answers = torch.stack([torch.arange(len(scoring)), torch.ones(len(scoring), dtype=torch.long),
                                    lengths[picked] - 1, starts[picked], of_row[picked]], 1).contiguous()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int, final: bool) -> torch.Tensor:
        layer = [kv[index] for kv in self.contexts.kv]
        table = torch.tensor([[keys.data_ptr(), values.data_ptr(), keys.shape[2]] for keys, values in layer],
                             dtype=torch.long).reshape(-1, 3)
        return self.kernel.attention(q.contiguous(), k, v.contiguous(), self.answers if final else self.every,
                                     table, self.scale)


class _TorchAttention:
    """Attention of a forward's rows by torch's kernels: each row's own keys (causal) on a padded
    layout, then each context as one call for all its queries, merged by log-sum-exps."""

    def __init__(self, layout: "_Layout", contexts: "_Contexts", scoring: list[int], scale: float) -> None:
        self.layout, self.contexts, self.scoring, self.scale = layout, contexts, scoring, scale
        self.subset = len(scoring) < layout.n

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int, final: bool) -> torch.Tensor:
        layout = self.layout
        k, v = layout.to_rows(k), layout.to_rows(v)
        if final:
            if self.subset:
                k, v = k[self.scoring], v[self.scoring]
            own, own_lse = self._attend_answers(q, k, v, layout.valid[self.scoring])
            groups = self.contexts.answer_groups(self.scoring)
        else:
            own, own_lse = _flash(layout.to_rows(q), k, v, True, None, self.scale)
            own, own_lse = layout.to_packed(own.transpose(1, 2)), layout.to_packed(own_lse.transpose(1, 2))
            groups = self.contexts.token_groups
        return self._with_contexts(q, own, own_lse, groups, self.contexts.kv, index)

    def _attend_answers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per row, at its last token, over its own row ``(rows, kv_heads, width, dim)``
        but not the padding."""
        mask = torch.zeros(len(q), 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
        own, own_lse = _flash(q.unsqueeze(2), k, v, False, mask, self.scale)
        return own[:, :, 0], own_lse[:, :, 0]

    def _with_contexts(self, q: torch.Tensor, own: torch.Tensor, own_lse: torch.Tensor,
                       groups: list[tuple[int, torch.Tensor | None]], contexts: list[KV], index: int) -> torch.Tensor:
        """Merge the rows' own attention ``(queries, heads, dim)`` with their contexts'.

        Each context is one unmasked flash-attention call for all the queries on it (its keys are
        never copied per row, and no per-row mask is built), merged with the own part by the
        log-sum-exps, which is exact. All in float32 (as fast here as bfloat16 for these shapes).
        """
        for j, idx in groups:  # idx None: every query sits on this context
            keys, values = contexts[j][index]
            q_j = q if idx is None else q[idx]
            ctx, ctx_lse = _flash(q_j.transpose(0, 1).unsqueeze(0), keys, values, False, None, self.scale)
            ctx, ctx_lse = ctx[0].transpose(0, 1), ctx_lse[0].transpose(0, 1)  # (queries, heads, dim / -)
            own_j, lse_j = (own, own_lse) if idx is None else (own[idx], own_lse[idx])
            # The own part's share of the softmax mass is sigmoid(own_lse - ctx_lse).
            merged = torch.lerp(ctx, own_j, torch.sigmoid(lse_j - ctx_lse)[..., None])
            if idx is None:
                return merged
            own[idx] = merged
        return own


@dataclass(frozen=True)
class Row:
    """A run of tokens after ``context`` (a cache, None for none). A scoring row yields the hidden
    state at its last token; an extending row yields ``context`` + its own keys and values."""

    tokens: Sequence[int]
    context: KV | None = None
    extend: bool = False


class _Contexts:
    """The distinct contexts of a forward's rows, and which queries sit on each."""

    def __init__(self, rows: Sequence[Row], layout: "_Layout", device: torch.device) -> None:
        self.kv: list[KV] = []
        self.device = device
        of_row = []
        for row in rows:
            if row.context is None:
                of_row.append(-1)
                continue
            j = next((j for j, kv in enumerate(self.kv) if kv is row.context), None)
            if j is None:
                self.kv.append(row.context)
                j = len(self.kv) - 1
            of_row.append(j)
        self.of_row = torch.tensor(of_row, dtype=torch.long)
        starts = torch.tensor([context_length(r.context) for r in rows], dtype=torch.long)
        self.positions = (starts.to(device)[layout.row_of] + layout.col_of)
        self.token_groups = self._groups(self.of_row[layout.row_of.cpu()])

    def answer_groups(self, scoring: list[int]) -> list[tuple[int, torch.Tensor | None]]:
        return self._groups(self.of_row[scoring])

    def _groups(self, of_query: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """Per context, the indices of the queries on it (None: all of them)."""
        if len(self.kv) == 1 and bool((of_query == 0).all()):
            return [(0, None)]
        return [(j, torch.nonzero(of_query == j).squeeze(1).to(self.device)) for j in range(len(self.kv))
                if bool((of_query == j).any())]


class _Layout:
    """Where each packed token sits in the (rows, width) layout attention uses."""

    def __init__(self, lengths: torch.Tensor, device: torch.device) -> None:
        self.n, self.width = len(lengths), int(lengths.max())
        row_of = torch.repeat_interleave(torch.arange(self.n), lengths)
        self.row_of = row_of.to(device)
        self.lengths = lengths
        self.starts = lengths.cumsum(0) - lengths  # each row's first token, packed (on the CPU)
        col_of = torch.arange(int(lengths.sum())) - torch.repeat_interleave(self.starts, lengths)
        self.col_of = col_of.to(device)
        self.slot = (row_of * self.width + col_of).to(device)
        self.last = (lengths.cumsum(0) - 1).to(device)  # each row's answer token, packed
        self.valid = torch.arange(self.width, device=device)[None, :] < lengths.to(device)[:, None]
        self.padded = self.n * self.width != len(col_of)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, heads, dim) packed -> (rows, heads, width, dim), zeros where a row is shorter."""
        if self.padded:
            out = x.new_zeros(self.n * self.width, *x.shape[1:])
            out[self.slot] = x
            x = out
        return x.view(self.n, self.width, *x.shape[1:]).transpose(1, 2)

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, width, ...) -> (tokens, ...), dropping the padding."""
        x = x.reshape(self.n * self.width, *x.shape[2:])
        return x[self.slot] if self.padded else x


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp (which merging needs, and the public
    ``scaled_dot_product_attention`` does not return) of ``q`` (batch, heads, queries, dim) over
    ``k``/``v`` (batch, kv_heads, keys, dim). On CPUs torch's flash kernel, with grouped-query
    heads native to it; elsewhere the same arithmetic written out."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                           scale=scale)[:2]
    return _attention_math(q, k, v, causal, mask, scale)


def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp from plain matmuls: the portable path (GPUs, where a
    forward is far from attention-bound at these sizes). A causal mask is top-left aligned, as in
    the flash kernel."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    if causal:
        n_q, n_k = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def _norm(module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's RMSNorm of the float32 residual stream, as torch's fused kernel (the same
    arithmetic as the module in float32, 2.5x faster here), rounded once to ``dtype``."""
    return F.rms_norm(x, module.weight.shape, module.weight.float(), module.variance_epsilon).to(dtype)


class _NativeNorm:
    """``_norm`` to bfloat16 by the native kernel: one pass, rounded once, instead of the fused norm
    in float32 and a cast. ``weights``: each layer norm's weight in float32, by module id (the
    decoder holds the modules, so the ids stay theirs)."""

    def __init__(self, kernel: NativeKernels, weights: dict[int, torch.Tensor]) -> None:
        self.kernel, self.weights = kernel, weights

    def __call__(self, module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.kernel.rms_norm(x, self.weights[id(module)], module.variance_epsilon)


def _mlp(mlp, x: torch.Tensor, silu: bool, kernel: NativeKernels | None) -> torch.Tensor:
    """The gated MLP, ``down(act(gate(x)) * up(x))``; with SiLU the activation and the product are
    written in place, into the largest buffer of the forward: in bfloat16 by the native kernel
    (CPUs only: the caller passes None elsewhere) in one float32 pass rounded once (torch's two
    bfloat16 passes round twice)."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if silu and kernel is not None and gate.dtype == torch.bfloat16:
        return mlp.down_proj(kernel.silu_mul_(gate, up))
    gate = F.silu(gate, inplace=True) if silu else mlp.act_fn(gate)
    return mlp.down_proj(gate.mul_(up))


class _TorchRotary:
    """A projection (tokens, heads, head_dim) to float32 with the rotary embedding applied, in torch;
    ``at`` picks the tokens the projection covers (all when None)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin  # (tokens, 1, head_dim) float32

    def __call__(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = (self.cos, self.sin) if at is None else (self.cos[at], self.sin[at])
        return _rotate(x.float(), cos, sin)


class _NativeRotary:
    """The same from a bfloat16 projection by the native kernel: one pass instead of a cast and
    five elementwise ones."""

    def __init__(self, kernel: NativeKernels, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.kernel = kernel
        self.cos, self.sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (tokens, head_dim)

    def __call__(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = (self.cos, self.sin) if at is None else (self.cos[at], self.sin[at])
        return self.kernel.rotary(x.contiguous(), cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, as transformers applies it."""
    return x * cos + rotate_half(x) * sin
