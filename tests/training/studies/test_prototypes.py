"""``reclora prototypes``: a trained RecLoRA scored with exact mixtures and with P prototypes."""

import pytest

from training.llm.train import LLMTrainConfig, train_llm
from training.studies.prompt_forms import FormsConfig
from training.studies.prototypes import PrototypesConfig, judge_prototypes


def test_prototypes_are_judged_against_exact_mixtures_on_the_same_requests(llm_world) -> None:
    root, data, emb, base = llm_world
    train_llm(data, emb, root / "crm", base, root / "gated",
              LLMTrainConfig(n_samples=32, k_text=3, epochs=1, batch_size=8, grad_accum=1, lr=5e-3, valid_samples=16,
                             evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
                             prompt_form="shared", request_size=4,
                             lora=dict(n_meta=3, user_dim=64, r=4, lora_alpha=8)))
    requests = FormsConfig(valid_samples=60, n_test=60, request_size=5, dtype="float32", k_text=3)
    big = len({u for u in data.split("train")["user_idx"]}) + 1
    with pytest.raises(Exception, match="distinct"):  # more prototypes than training users is refused
        judge_prototypes(data, emb, root / "crm", base, root / "gated", root / "protos",
                         PrototypesConfig((big,), requests), echo=lambda _: None)
    cfg = PrototypesConfig((1, 2, 8), requests)
    result = judge_prototypes(data, emb, root / "crm", base, root / "gated", root / "protos", cfg, echo=lambda _: None)
    exact, *rows = result["valid"]
    assert [r["config"] for r in result["valid"]] == ["exact", "P=1", "P=2", "P=8"]
    assert "valid_diff" not in exact
    for row in rows:
        assert row["valid_diff"] == pytest.approx(row["valid_auc"] - exact["valid_auc"])
        assert row["valid_diff_se"] >= 0 and row["valid_fused_diff_se"] >= 0
    chosen = result["smallest_within_one_se"]
    assert chosen in (1, 2, 8)
    assert result["test"]["count"] == chosen and result["test"]["exact_auc"] > 0
    table = (root / "protos" / "prototypes.md").read_text()
    assert "| P=8 |" in table and f"Smallest P within one standard error of exact (LLM alone): {chosen}" in table
    again = judge_prototypes(data, emb, root / "crm", base, root / "gated", root / "protos", cfg, echo=lambda _: None)
    assert again["valid"] == result["valid"]  # read back, not scored again
