"""The native CPU kernels (attention, the MLP's SiLU product) against torch, and their build."""

import logging
import shutil

import torch.nn.functional as F

import pytest
import torch

from service.engine import native

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the native kernels")


@pytest.fixture(scope="module")
def kernel() -> native.NativeKernels:
    built = native.load()
    assert built is not None, "the native kernels failed to build"
    return built


def reference(q, k, v, rows, contexts, scale):
    """Per row: softmax over the context's keys and the own keys up to each query's position."""
    out = torch.empty_like(q)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    for q0, nq, pos, k0, c in rows.tolist():
        ck, cv = contexts[c] if c >= 0 else (torch.zeros(1, kv_heads, 0, dim), torch.zeros(1, kv_heads, 0, dim))
        keys = torch.cat([ck[0], k[k0 : k0 + pos + nq].transpose(0, 1)], 1).repeat_interleave(heads // kv_heads, 0)
        values = torch.cat([cv[0], v[k0 : k0 + pos + nq].transpose(0, 1)], 1).repeat_interleave(heads // kv_heads, 0)
        scores = q[q0 : q0 + nq].transpose(0, 1) @ keys.transpose(1, 2) * scale  # (heads, nq, keys)
        seen = ck.shape[2] + pos + torch.arange(nq) + 1
        scores.masked_fill_(torch.arange(keys.shape[1])[None, None, :] >= seen[None, :, None], float("-inf"))
        out[q0 : q0 + nq] = (torch.softmax(scores, -1) @ values).transpose(0, 1)
    return out


def table(contexts):
    return torch.tensor([[k.data_ptr(), v.data_ptr(), k.shape[2]] for k, v in contexts], dtype=torch.long).reshape(-1, 3)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 24), (6, 2, 8), (2, 1, 130)])
def test_rows_on_contexts_equal_written_out_attention(kernel, heads, kv_heads, dim) -> None:
    """Rows on no context, on one cache and on another; every token a query, or only some (the
    answer positions, a tail of the row)."""
    torch.manual_seed(heads * dim)
    contexts = [(torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)) for n in (40, 3, 150)]
    lengths, context_of = [5, 120, 1, 33, 70, 17], [0, 1, -1, 2, 0, -1]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    k, v = torch.randn(sum(lengths), kv_heads, dim), torch.randn(sum(lengths), kv_heads, dim)
    every = torch.tensor([[s, n, 0, s, c] for s, n, c in zip(starts, lengths, context_of)], dtype=torch.long)
    answers = torch.tensor([[i, 1, n - 1, s, c] for i, (s, n, c) in enumerate(zip(starts, lengths, context_of))],
                           dtype=torch.long)
    tails = torch.tensor([[3 * i, 3, n - 3, s, c] for i, (s, n, c) in enumerate(zip(starts, lengths, context_of))
                          if n >= 3], dtype=torch.long)
    tails[:, 0] = torch.arange(len(tails)) * 3
    for rows in (every, answers, tails):
        q = torch.randn(int(rows[:, 1].sum()), heads, dim)
        got = kernel.attention(q, k, v, rows, table(contexts), 0.2)
        torch.testing.assert_close(got, reference(q, k, v, rows, contexts, 0.2), atol=1e-5, rtol=1e-4)


def test_large_scores_stay_finite(kernel) -> None:
    """Softmax is taken after the largest score is subtracted: scores in the thousands neither
    overflow nor lose the row."""
    torch.manual_seed(3)
    q, k, v = torch.randn(20, 2, 16) * 40, torch.randn(20, 2, 16) * 40, torch.randn(20, 2, 16)
    rows = torch.tensor([[0, 20, 0, 0, -1]], dtype=torch.long)
    got = kernel.attention(q, k, v, rows, table([]), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, k, v, rows, [], 1.0), atol=1e-5, rtol=1e-5)


def test_only_contiguous_float32_tensors_are_taken(kernel) -> None:
    rows = torch.tensor([[0, 4, 0, 0, -1]], dtype=torch.long)
    q, k = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="float32"):
        kernel.attention(q.double(), k, k, rows, table([]), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attention(torch.randn(2, 4, 16).transpose(0, 1), k, k, rows, table([]), 1.0)


def test_a_context_index_out_of_range_is_an_error_not_a_read(kernel) -> None:
    rows = torch.tensor([[0, 4, 0, 0, 2]], dtype=torch.long)
    q, k = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="code 2"):
        kernel.attention(q, k, k, rows, table([]), 1.0)


def test_a_build_is_cached_per_directory(tmp_path) -> None:
    built = native.load(tmp_path)
    assert built is not None
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1
    assert native.load(tmp_path) is built


def test_without_a_compiler_the_engine_falls_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING):
        assert native.load(tmp_path / "cache") is None
    assert "torch's kernels" in caplog.text


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4 * 1536 + 5])
def test_silu_product_is_float32_arithmetic_rounded_once(kernel, n) -> None:
    gate = (torch.randn(n) * 6).bfloat16()
    gate[: min(n, 4)] = torch.tensor([0.0, -90.0, 90.0, -0.5])[: min(n, 4)].bfloat16()
    up = (torch.randn(n) * 3).bfloat16()
    exact = (F.silu(gate.double()) * up.double()).float()
    got = kernel.silu_mul_(gate.clone(), up)
    assert got.dtype == torch.bfloat16
    # one rounding of the float32 result: within half a bfloat16 step, 2^-8 relative
    torch.testing.assert_close(got.float(), exact, rtol=2.0 ** -8 + 1e-6, atol=1e-30)
    if n > 1000:  # and nearer the exact product than torch's two bfloat16 passes, which round twice
        two_pass = F.silu(gate.clone(), inplace=True).mul_(up).float()
        assert (got.float() - exact).abs().mean() < (two_pass - exact).abs().mean()


def test_silu_product_overwrites_gate_and_keeps_nan(kernel) -> None:
    gate = torch.tensor([1.0, float("nan"), -2.0, 3.0]).bfloat16()
    up = torch.tensor([2.0, 1.0, float("nan"), 0.5]).bfloat16()
    out = kernel.silu_mul_(gate, up)
    assert out.data_ptr() == gate.data_ptr()
    assert torch.isnan(out[1:3]).all()
    torch.testing.assert_close(out[[0, 3]].float(), (F.silu(torch.tensor([1.0, 3.0])) * torch.tensor([2.0, 0.5])),
                               rtol=2.0 ** -8, atol=0.0)


def test_silu_product_takes_only_matching_contiguous_bfloat16(kernel) -> None:
    g = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        kernel.silu_mul_(g.float(), g.float())
    with pytest.raises(ValueError, match="bfloat16"):
        kernel.silu_mul_(g.t(), g)
    with pytest.raises(ValueError, match="shape"):
        kernel.silu_mul_(g, g[:2].contiguous())


@pytest.mark.parametrize("tokens, width", [(1, 16), (7, 576), (300, 64)])
def test_rms_norm_is_the_float32_norm_rounded_once(kernel, tokens, width) -> None:
    x = torch.randn(tokens, width) * 3
    weight = torch.randn(width)
    got = kernel.rms_norm(x, weight, 1e-5)
    exact = F.rms_norm(x.double(), (width,), weight.double(), 1e-5).float()
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got.float(), exact, rtol=2.0 ** -8 + 1e-5, atol=1e-30)  # one rounding


def test_rms_norm_takes_only_float32_of_a_width_of_sixteens(kernel) -> None:
    with pytest.raises(ValueError, match="float32"):
        kernel.rms_norm(torch.randn(2, 16).bfloat16(), torch.randn(16), 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel.rms_norm(torch.randn(2, 20), torch.randn(20), 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel.rms_norm(torch.randn(2, 16), torch.randn(32), 1e-5)


def test_a_cache_others_may_write_is_never_loaded_from(tmp_path, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = shared / f"kernels-{native._build_key()}.so"
    planted.write_bytes(b"not a library")  # what another user could leave there
    with caplog.at_level(logging.WARNING):
        built = native.load(shared)
    assert built is not None, "the kernels are built privately instead"
    assert "may be written by other users" in caplog.text
    assert planted.read_bytes() == b"not a library"  # left alone, and not loaded


def test_a_cache_file_others_may_write_is_not_loaded(tmp_path) -> None:
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    library = own / f"kernels-{native._build_key()}.so"
    library.write_bytes(b"rewritten by someone else")  # never a library this process mapped:
    library.chmod(0o666)  # rewriting a mapped one would crash the process (SIGBUS)
    assert native.load(own) is not None  # loading the file would have failed
    assert native._private(own) and not native._private(library)
    assert library.read_bytes() == b"rewritten by someone else"


@pytest.mark.parametrize("heads,dim", [(9, 64), (3, 64), (2, 6), (1, 130)])
def test_rotary_equals_transformers_on_the_bfloat16_projection(kernel, heads, dim) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    tokens = 23
    x = torch.randn(tokens, heads, dim).bfloat16()
    angles = torch.rand(tokens, dim // 2) * 40
    cos, sin = torch.cat([angles.cos()] * 2, 1), torch.cat([angles.sin()] * 2, 1)
    # transformers' layout: (batch, heads, tokens, dim) with cos/sin (batch, tokens, dim)
    expected, _ = apply_rotary_pos_emb(x.float().transpose(0, 1)[None], x.float().transpose(0, 1)[None],
                                       cos[None], sin[None])
    got = kernel.rotary(x, cos, sin)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_rotary_refuses_mismatched_shapes(kernel) -> None:
    x = torch.randn(4, 2, 8).bfloat16()
    with pytest.raises(ValueError, match="cos/sin"):
        kernel.rotary(x, torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="bfloat16"):
        kernel.rotary(x.float(), torch.randn(4, 8), torch.randn(4, 8))
