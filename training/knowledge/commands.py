"""``reclora knowledge``: generate, keep and encode item and user knowledge with the base LLM."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.cli_support import fail, timed


def knowledge(
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory")],
    base_model: Annotated[Path, typer.Option(help="base LLM directory (from `reclora base-model`)")],
    out: Annotated[Optional[Path], typer.Option(help="knowledge directory (default DATA/knowledge)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="longest generated text, in tokens")] = 96,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts decoded together (embedded engine)")] = 16,
    repetition_penalty: Annotated[float, typer.Option(
        min=1.0, help="above 1 discourages repeated phrases (decoding stays greedy)")] = 1.15,
    encoder: Annotated[str, typer.Option(
        help="all-MiniLM-L6-v2 (offline sentence encoder) or base-llm-mean (the base LLM's mean-pooled "
             "hidden states)")] = "all-MiniLM-L6-v2",
    factors: Annotated[Optional[str], typer.Option(
        help="comma-separated item attributes the prompts ask about (default: by the dataset's item noun)")] = None,
    max_behaviours: Annotated[int, typer.Option(min=1, help="most recent rated items in a user prompt")] = 10,
    dtype: Annotated[str, typer.Option(
        help="float32 (default: decoding is faster in float32 on CPUs), bfloat16, or auto")] = "float32",
    limit_items: Annotated[Optional[int], typer.Option(help="only the first N items (a quick try)")] = None,
    limit_users: Annotated[Optional[int], typer.Option(help="only the first N users (a quick try)")] = None,
    restart: Annotated[bool, typer.Option(help="discard texts generated earlier into OUT")] = False,
    threads: Optional[int] = None,
    engine: Annotated[str, typer.Option(
        help="embedded (the base LLM in this process) or vllm (vLLM's offline batch API in vLLM's own "
             "environment, from the same prompt tokens with the same stopping rules)")] = "embedded",
    vllm_python: Annotated[Optional[str], typer.Option(
        help="Python of the environment with vLLM (--engine vllm; default $RECLORA_VLLM_PYTHON)")] = None,
    vllm_chunk: Annotated[int, typer.Option(min=1, help="prompts per vLLM call, kept together (--engine vllm)")] = 256,
    vllm_engine_args: Annotated[Optional[str], typer.Option(
        help='JSON object of further vllm.LLM arguments, e.g. \'{"enforce_eager": false}\' (--engine vllm)')] = None,
) -> None:
    """Item and user knowledge (KAR / Laser) from the base LLM: resumable, kept as parquet, encoded."""
    import json

    import torch

    from service.knowledge.encode import ENCODERS
    from service.knowledge.prompts import knowledge_prompts_for
    from training.knowledge.build import ENGINES, KnowledgeConfig, KnowledgeRunMismatch, build_knowledge
    from training.knowledge.vllm_engine import VLLM_PYTHON_ENV, VLLMGenerationError, default_vllm_python

    if encoder not in ENCODERS:
        fail(f"--encoder must be one of {', '.join(ENCODERS)}, not {encoder!r}")
    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    engine_args: dict = {}
    if engine == "vllm":
        vllm_python = vllm_python or default_vllm_python()
        if not vllm_python:
            fail(f"--engine vllm needs the Python of an environment with vLLM: --vllm-python or ${VLLM_PYTHON_ENV}")
        if not shutil.which(vllm_python):
            fail(f"--vllm-python {vllm_python!r} is not an executable")
        try:
            engine_args = json.loads(vllm_engine_args) if vllm_engine_args else {}
        except json.JSONDecodeError as exc:
            fail(f"--vllm-engine-args is not JSON: {exc}")
        if not isinstance(engine_args, dict):
            fail("--vllm-engine-args must be a JSON object")
    if threads:
        torch.set_num_threads(threads)
    target = out or data / "knowledge"
    if restart and target.exists():
        shutil.rmtree(target)
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").is_file() else {}
    prompts = knowledge_prompts_for(meta, [f.strip() for f in factors.split(",") if f.strip()] if factors else None,
                                    max_behaviours=max_behaviours)
    cfg = KnowledgeConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                          repetition_penalty=repetition_penalty, encoder=encoder, dtype=dtype,
                          limit_items=limit_items, limit_users=limit_users, engine=engine, vllm_python=vllm_python,
                          vllm_chunk=vllm_chunk, vllm_engine_args=engine_args)
    with timed("knowledge"):
        try:
            result = build_knowledge(data, base_model, target, prompts, cfg)
        except (KnowledgeRunMismatch, VLLMGenerationError) as exc:
            fail(str(exc))
    gen = result["generation"]
    typer.echo(f"knowledge in {target}: {result['counts']['items']} items, {result['counts']['users']} users "
               f"(histories before {result['cutoff_timestamp']}), {gen['new_tokens']:,} tokens generated in "
               f"{gen['seconds']:.0f} s ({gen['tokens_per_s']:.0f} tokens/s), encoded by {result['encoder']} "
               f"into {result['dim']} floats")


COMMANDS = {"knowledge": knowledge}


def register(app: typer.Typer) -> None:
    """Add these commands to the ``reclora`` app."""
    for name, command in COMMANDS.items():
        app.command(name)(command)
