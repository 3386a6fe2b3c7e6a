"""Packed training batches on a tiny random Llama (float32): the same loss and gradients as padded
rows, and no instance ever sees another's tokens; a request (one prefix, several suffixes) the same
as its candidates' whole prompts, with the prefix in the row once."""

import pytest
import torch

from service.llm.personalized_lora import PersonalizedLoRA, PersonalizedLoRAConfig
from tests.tiny_llama import build_tiny_llama
from training.llm.loading import load_base
from training.llm.packing import pack, pack_requests, packed_answer_hidden, token_budget_groups
from training.llm.prompts import RequestPrompt
from training.llm.scoring import answer_hidden, pad_right
from training.llm.train import LLMTrainConfig
from training.llm.train_step import AnswerLoss, FusedLoss, TrainSet, accumulate_step

YES, NO, PAD = 60, 61, 3  # any two in-vocabulary ids serve as the label tokens here
USER_DIM = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", hidden_size=32, layers=2)


def prompts(n: int = 11, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 200, (int(k),), generator=g).tolist() for k in torch.randint(15, 50, (n,), generator=g)]


def trained_lora(base, gated: bool = True):
    """The tiny model with a LoRA whose B banks are non-zero (a fresh LoRA's delta is exactly zero)."""
    torch.manual_seed(0)
    model, _ = load_base(base, "float32", "cpu")
    cfg = PersonalizedLoRAConfig(n_meta=4 if gated else 1, gated=gated, user_dim=USER_DIM, r=4, lora_alpha=8)
    lora = PersonalizedLoRA(model, cfg)
    g = torch.Generator().manual_seed(1)
    for layer in lora.layers.values():
        layer.lora_B.data.normal_(0.0, 0.2, generator=g)
    return model, lora.eval()


def train_set(seqs: list[list[int]]) -> TrainSet:
    g = torch.Generator().manual_seed(2)
    return TrainSet.build(seqs, torch.randn(len(seqs), USER_DIM, generator=g), [i % 2 for i in range(len(seqs))],
                          YES, NO, torch.device("cpu"), torch.randn(len(seqs), generator=g))


def step(base, packing: bool, objective: str, gated: bool = True, dropout: bool = True,
         **cfg) -> tuple[float, int, dict[str, torch.Tensor]]:
    """One optimizer step's loss, token count and gradients (LoRA banks, gates; w and b when fused)."""
    model, lora = trained_lora(base, gated)
    loss_fn = FusedLoss(model, YES, NO) if objective == "fused" else AnswerLoss(model)
    data = train_set(prompts())
    lora.train(dropout)  # gate dropout on: the same micro-batches draw the same masks in the same order
    torch.manual_seed(7)
    total, tokens = accumulate_step(model, lora, loss_fn, data, [3, 0, 7, 1, 9, 4, 10, 2, 8],
                                    LLMTrainConfig(batch_size=4, packing=packing, **cfg), PAD)
    grads = {n: p.grad for n, p in [*lora.named_parameters(), *loss_fn.named_parameters()] if p.grad is not None}
    return total, tokens, grads


def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float32 summation order: 1e-5 of the tensor's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_pack_concatenates_with_restarting_positions() -> None:
    batch = pack([torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])])
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.bounds.tolist() == [0, 3, 4, 6] and batch.last.tolist() == [2, 3, 5]
    assert batch.lengths == (3, 1, 2) and batch.tokens == 6
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([torch.tensor([1]), torch.tensor([], dtype=torch.long)])


def test_token_budget_keeps_order_and_budget() -> None:
    lengths = [4, 4, 3, 9, 2, 2]
    groups = token_budget_groups([0, 1, 2, 3, 4, 5], lengths, budget=8)
    assert groups == [[0, 1], [2], [3], [4, 5]]  # 9 > 8 goes alone
    assert [i for g in groups for i in g] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("objective", ["answer", "fused"])
@pytest.mark.parametrize("gated", [True, False])
def test_packed_step_equals_the_padded_step(base, objective: str, gated: bool) -> None:
    padded = step(base, False, objective, gated)
    packed = step(base, True, objective, gated)
    assert packed[1] == padded[1]  # the same real tokens, none of them padding
    assert packed[0] == pytest.approx(padded[0], rel=1e-6)
    assert set(packed[2]) == set(padded[2]) and any(k.endswith("gate.net.1.weight") for k in packed[2]) == gated
    for name, grad in padded[2].items():
        assert grad.abs().max() > 0, name
        close(packed[2][name], grad, name)


def test_a_token_budget_splits_forwards_but_not_the_step(base) -> None:
    by_count = step(base, True, "answer", dropout=False)  # other rows would draw other dropout masks
    by_tokens = step(base, True, "answer", dropout=False, pack_tokens=64)  # 1-2 instances a row, not 4
    assert by_tokens[0] == pytest.approx(by_count[0], rel=1e-6)
    for name, grad in by_count[2].items():
        close(by_tokens[2][name], grad, name)


def test_no_instance_attends_to_another(base) -> None:
    model, lora = trained_lora(base)
    seqs = prompts(4)
    reps = torch.randn(4, USER_DIM, generator=torch.Generator().manual_seed(3))

    def hidden(batch_seqs: list[list[int]], user_reps: torch.Tensor) -> torch.Tensor:
        batch = pack([torch.tensor(s) for s in batch_seqs])
        with torch.no_grad(), lora.user(user_reps, segments=batch.lengths):
            return packed_answer_hidden(model, batch)

    packed = hidden(seqs, reps)
    changed = [seqs[0], [s + 1 for s in seqs[1]] + [7, 8], seqs[2], seqs[3][:5]]  # B and D rewritten
    other = hidden(changed, torch.cat([reps[:1], torch.randn(1, USER_DIM), reps[2:]]))
    assert torch.equal(other[0], packed[0])  # A comes first: nothing of B's can reach it
    torch.testing.assert_close(other[2], packed[2], rtol=0, atol=1e-6)  # C after a longer, different B
    assert not torch.allclose(other[1], packed[1])
    for i, s in enumerate(seqs):  # each alone, positions from 0, its own user
        ids, mask, last = pad_right([s], PAD)
        with torch.no_grad(), lora.user(reps[i : i + 1]):
            alone = answer_hidden(model, ids, mask, last)
        torch.testing.assert_close(packed[i], alone[0], rtol=0, atol=1e-5)


def test_packed_lora_needs_one_row_of_the_segments(base) -> None:
    model, lora = trained_lora(base)
    batch = pack([torch.tensor(s) for s in prompts(2)])
    with lora.user(torch.randn(2, USER_DIM), segments=(batch.lengths[0], batch.lengths[1] + 1)):
        with pytest.raises(ValueError, match="packed segments"):
            packed_answer_hidden(model, batch)


def test_training_config_refuses_what_the_loop_cannot_run() -> None:
    for bad in (dict(objective="margin"), dict(pack_tokens=-1), dict(batch_size=0),
                dict(packing=False, pack_tokens=512), dict(request_size=0), dict(request_size=4), dict(request_size=4, prompt_form="shared", packing=False)):
        with pytest.raises(ValueError):
            LLMTrainConfig(**bad).check()


def requests(n: int = 5, seed: int = 4) -> list[RequestPrompt]:
    """Requests of 1 to 4 candidates: a prefix of 10-30 tokens, suffixes of 3-12."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(10, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [RequestPrompt(ids(10, 30), [ids(3, 12) for _ in range(int(torch.randint(1, 5, (1,), generator=g)))])
            for _ in range(n)]


def test_pack_requests_lays_out_prefix_once_and_suffixes_after_it() -> None:
    batch = pack_requests([(torch.tensor([5, 6, 7]), [torch.tensor([8, 9]), torch.tensor([10])]),
                           (torch.tensor([11]), [torch.tensor([12, 13])])])
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2]]  # each suffix continues the prefix
    assert batch.lengths == (6, 3) and batch.last.tolist() == [4, 5, 8]
    assert batch.trees == ((3, (2, 1)), None)  # one suffix: a plain causal sequence
    with pytest.raises(ValueError):
        pack_requests([(torch.tensor([1]), [])])


def test_a_request_scores_and_trains_as_its_candidates_whole_prompts(base) -> None:
    reqs = requests()
    whole = [r.prefix + s for r in reqs for s in r.suffixes]
    per_request = torch.randn(len(reqs), USER_DIM, generator=torch.Generator().manual_seed(5))
    reps = torch.cat([per_request[i : i + 1].expand(len(r.suffixes), -1) for i, r in enumerate(reqs)])
    labels = [i % 2 for i in range(len(whole))]
    logits = torch.randn(len(whole), generator=torch.Generator().manual_seed(6))

    def one_step(data: TrainSet, rows: list[int], objective: str) -> tuple[float, dict[str, torch.Tensor]]:
        model, lora = trained_lora(base)
        loss_fn = FusedLoss(model, YES, NO) if objective == "fused" else AnswerLoss(model)
        lora.train(False)  # no dropout: the two layouts would draw different masks
        total, _ = accumulate_step(model, lora, loss_fn, data, rows, LLMTrainConfig(batch_size=3), PAD)
        return total, {n: p.grad for n, p in [*lora.named_parameters(), *loss_fn.named_parameters()]
                       if p.grad is not None}

    for objective in ("answer", "fused"):
        grouped = TrainSet.build_requests(reqs, per_request, labels, YES, NO, torch.device("cpu"), logits)
        assert len(grouped) == len(reqs) and grouped.n_instances == len(whole)
        assert grouped.lengths == [len(r.prefix) + sum(map(len, r.suffixes)) for r in reqs]
        flat = TrainSet.build(whole, reps, labels, YES, NO, torch.device("cpu"), logits)
        total, grads = one_step(grouped, list(range(len(reqs))), objective)
        expected, expected_grads = one_step(flat, list(range(len(whole))), objective)
        assert total == pytest.approx(expected, rel=1e-5)
        assert set(grads) == set(expected_grads)
        for name, grad in expected_grads.items():
            close(grads[name], grad, name)
    with pytest.raises(ValueError, match="suffixes"):
        TrainSet.build_requests(reqs, per_request, labels[:-1], YES, NO, torch.device("cpu"))


def test_a_suffix_never_sees_another_suffix(base) -> None:
    model, lora = trained_lora(base)
    prefix, suffixes = torch.arange(10, 30), [torch.arange(40, 48), torch.arange(50, 55), torch.arange(60, 70)]
    rep = torch.randn(1, USER_DIM, generator=torch.Generator().manual_seed(8))

    def hidden(parts: list[torch.Tensor]) -> torch.Tensor:
        batch = pack_requests([(prefix, parts)])
        with torch.no_grad(), lora.user(rep, segments=batch.lengths):
            return packed_answer_hidden(model, batch)

    packed = hidden(suffixes)
    changed = hidden([suffixes[0], torch.arange(100, 112), suffixes[2]])  # the middle suffix rewritten, longer
    # float32 rounding only (a longer pack changes the matmuls' shapes); a leak would move these by far more
    torch.testing.assert_close(changed[0], packed[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(changed[2], packed[2], rtol=0, atol=1e-5)
    assert not torch.allclose(changed[1], packed[1])
