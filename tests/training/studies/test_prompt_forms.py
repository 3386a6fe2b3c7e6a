"""The prompt-forms study's pick of what to serve follows the export's rule (``fusion_fit.decide``)."""

from __future__ import annotations

from training.studies.prompt_forms import served_pick


def test_the_fusion_by_support_is_picked_only_where_it_beats_the_plain_one_and_the_crm() -> None:
    assert served_pick({"plain": 0.71, "by_support": 0.72}, crm_valid_auc=0.70) == "by_support"
    assert served_pick({"plain": 0.72, "by_support": 0.71}, crm_valid_auc=0.70) == "plain"
    assert served_pick({"plain": 0.70, "by_support": 0.69}, crm_valid_auc=0.705) == "crm"
    assert served_pick({"plain": 0.69, "by_support": 0.70}, crm_valid_auc=0.70) == "crm"  # a tie is no gain
