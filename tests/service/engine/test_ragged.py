import shutil

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots
from service.engine import native
from service.engine import ragged as ragged_module
from service.engine.ragged import RaggedDecoder, Row, UnsupportedModel


def make_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module", params=["torch", "native"])
def kernel(request):
    """Both attention paths of the CPU forward: torch's kernels, and the native kernel (which a
    machine with a C++ compiler must build)."""
    if request.param == "torch":
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the native attention")
    built = native.load()
    assert built is not None, "the native attention failed to build"
    return built


def reference_hidden(model, context: list[int], row: list[int]) -> torch.Tensor:
    """transformers' own forward of context + row: the final-norm hidden state of the last token."""
    with torch.inference_mode():
        return model.get_decoder()(input_ids=torch.tensor([context + row])).last_hidden_state[0, -1]


def rows(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 99, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("context_len", [0, 11])
def test_packed_rows_equal_transformers_per_row(model, kernel, context_len) -> None:
    ragged = RaggedDecoder(model, kernel)
    context = rows(1, [context_len])[0]
    suffixes = rows(2, [5, 1, 13, 7, 7, 2])
    with torch.inference_mode():
        kv = ragged.forward(None, 0, [context], extend=True)[1] if context else None
        hidden, _ = ragged.forward(kv, len(context), suffixes)
    for got, suffix in zip(hidden, suffixes):
        torch.testing.assert_close(got, reference_hidden(model, context, suffix), atol=2e-5, rtol=1e-4)


def test_extended_cache_equals_transformers_cache(model, kernel) -> None:
    ragged = RaggedDecoder(model, kernel)
    first, second = rows(3, [9, 6])
    with torch.inference_mode():
        kv = ragged.forward(ragged.forward(None, 0, [first], extend=True)[1], 9, [second], extend=True)[1]
        expected = model.get_decoder()(input_ids=torch.tensor([first + second]), use_cache=True,
                                       past_key_values=DynamicCache(config=model.config)).past_key_values
    assert len(kv) == model.config.num_hidden_layers
    for (k, v), layer in zip(kv, expected.layers):
        torch.testing.assert_close(k, layer.keys, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(v, layer.values, atol=2e-5, rtol=1e-4)


def test_lora_slots_act_in_the_packed_forward() -> None:
    model = make_model()
    ragged = RaggedDecoder(model)
    suffixes = rows(4, [4, 8])
    with torch.inference_mode():
        plain, _ = ragged.forward(None, 0, suffixes)
    slots = LoRASlots(model, ["q_proj", "v_proj", "down_proj"])
    weights = {name: (torch.randn(slot.base.in_features, 4) * 0.3, torch.randn(4, slot.base.out_features) * 0.3)
               for name, slot in slots.slots.items()}
    slots.install(UserAdapter("u", weights, 1.0))
    with torch.inference_mode():
        adapted, _ = ragged.forward(None, 0, suffixes)
        expected = torch.stack([reference_hidden(model, [], s) for s in suffixes])
    assert not torch.allclose(plain, adapted, atol=1e-3)
    torch.testing.assert_close(adapted, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("context_len", [0, 9])
def test_bfloat16_weights_score_closer_to_exact_than_a_bfloat16_forward(kernel, context_len) -> None:
    """bfloat16 weights, float32 residual stream: nearer the exact (float32) forward of the same
    weights than transformers' all-bfloat16 forward is, on torch's kernels and on the native ones
    (rotary and the SiLU product from bfloat16 projections), with and without a cached context."""
    half = make_model(torch.bfloat16)
    exact = make_model(torch.bfloat16).float()  # the same rounded weights, computed in float32
    context = rows(4, [context_len])[0]
    suffixes = rows(5, [6, 15, 3, 40])
    ragged = RaggedDecoder(half, kernel)
    with torch.inference_mode():
        kv = ragged.forward(None, 0, [context], extend=True)[1] if context else None
        hidden, _ = ragged.forward(kv, len(context), suffixes)
    assert hidden.dtype == torch.float32
    ours, theirs = [], []
    for got, suffix in zip(hidden, suffixes):
        reference = reference_hidden(exact, context, suffix)
        ours.append((got - reference).abs().max().item())
        theirs.append((reference_hidden(half, context, suffix).float() - reference).abs().max().item())
        torch.testing.assert_close(got, reference, atol=0.05, rtol=0.02)
    assert max(ours) < max(theirs)


def test_the_layer_hook_runs_before_every_layer(model) -> None:
    calls = []
    with torch.inference_mode():
        RaggedDecoder(model).forward(None, 0, rows(6, [3, 4]), before_layer=lambda: calls.append(1))
    assert len(calls) == model.config.num_hidden_layers


def test_extend_takes_one_row(model) -> None:
    with pytest.raises(ValueError, match="one row"):
        RaggedDecoder(model).forward(None, 0, rows(7, [2, 3]), extend=True)


def test_unknown_architectures_are_refused() -> None:
    cfg = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModel, match="mistral"):
        RaggedDecoder(MistralForCausalLM(cfg))


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (False, False)])
def test_portable_attention_equals_the_cpu_flash_kernel(causal, masked) -> None:
    """The path devices other than CPUs take gives the flash kernel's output and log-sum-exp."""
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 6, 9, 8), torch.randn(3, 2, 9 if causal else 5, 8), torch.randn(3, 2, 9 if causal else 5, 8)
    mask = None
    if masked:
        mask = torch.zeros(3, 1, 1, 5)
        mask[0, ..., 3:] = float("-inf")
        q = q[:, :, :1]
    want = ragged_module._flash(q, k, v, causal, mask, 0.3)
    got = ragged_module._attention_math(q, k, v, causal, mask, 0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_rows_on_the_portable_attention_equal_transformers(model, monkeypatch) -> None:
    monkeypatch.setattr(ragged_module, "_flash", ragged_module._attention_math)
    context, suffixes = rows(3, [7])[0], rows(4, [5, 9, 1])
    with torch.inference_mode():
        _, kv = RaggedDecoder(model).forward(None, 0, [context], extend=True)
        hidden, _ = RaggedDecoder(model).forward(kv, len(context), suffixes)
    for got, suffix in zip(hidden, suffixes):
        torch.testing.assert_close(got, reference_hidden(model, context, suffix), atol=2e-5, rtol=1e-4)


def test_one_forward_of_rows_on_different_contexts_equals_transformers_per_row(model, kernel) -> None:
    """A radix level: rows that extend or score, on no context, on one cache, or on another."""
    ragged = RaggedDecoder(model, kernel)
    first, second = rows(6, [5])[0], rows(7, [9])[0]
    with torch.inference_mode():
        ctx_a = ragged.forward(None, 0, [first], extend=True)[1]
        ctx_b = ragged.forward(None, 0, [second], extend=True)[1]
        level = [Row(r, ctx_a) for r in rows(8, [3, 7])] + [Row(rows(9, [4])[0], ctx_b, extend=True)]
        level += [Row(rows(10, [6])[0], None), Row(rows(11, [2])[0], ctx_b), Row(rows(12, [8])[0], ctx_a, extend=True)]
        hidden, caches = ragged.run(level)
    contexts = {id(ctx_a): first, id(ctx_b): second, id(None): []}
    scored = [r for r in level if not r.extend]
    assert hidden.shape[0] == len(scored) and len(caches) == 2
    for got, row in zip(hidden, scored):
        torch.testing.assert_close(got, reference_hidden(model, contexts[id(row.context)], list(row.tokens)),
                                   atol=2e-5, rtol=1e-4)
    for cache, row in zip(caches, [r for r in level if r.extend]):
        tokens = contexts[id(row.context)] + list(row.tokens)
        with torch.inference_mode():
            reference = model.get_decoder()(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
        for (k, v), layer in zip(cache, reference.layers):
            torch.testing.assert_close(k, layer.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(v, layer.values, atol=2e-5, rtol=1e-4)


def test_bfloat16_mlp_on_the_native_kernel_rounds_the_silu_product_once(kernel) -> None:
    """In bfloat16 on CPUs the gated MLP's SiLU and product come from the native kernel, in float32
    rounded once; torch's path is kept where there is no kernel."""
    mlp = make_model(torch.bfloat16).model.layers[0].mlp
    x = torch.randn(37, 48).bfloat16()
    with torch.inference_mode():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        once = mlp.down_proj((torch.nn.functional.silu(gate.float()) * up.float()).bfloat16())
        twice = mlp.down_proj(torch.nn.functional.silu(gate) * up)
        got = ragged_module._mlp(mlp, x, True, kernel)
    torch.testing.assert_close(got, once if kernel is not None else twice, atol=1e-2, rtol=1e-2)
    if kernel is not None:
        assert (got.float() - once.float()).abs().max() < (twice.float() - once.float()).abs().max()
