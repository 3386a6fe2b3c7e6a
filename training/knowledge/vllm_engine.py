"""``reclora knowledge --engine vllm``: the prompts' token ids to vLLM's interpreter, the ids back.

vLLM cannot be imported beside the project (its pins differ), so generation runs in a child
process on vLLM's own Python (``vllm_batch.py``, run by path so nothing of this environment is
on its import path). The child appends one JSON line per finished chunk of prompts; this side
reads them as they come and hands each chunk on (``on_chunk``), so a killed run keeps every chunk
already written into the part store, as the embedded path keeps its batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VLLM_PYTHON_ENV = "RECLORA_VLLM_PYTHON"
RUNNER = Path(__file__).with_name("vllm_batch.py")


class VLLMGenerationError(RuntimeError):
    """The vLLM child process failed; the message ends with its log's tail."""


def default_vllm_python() -> str | None:
    return os.environ.get(VLLM_PYTHON_ENV) or None


@dataclass
class VLLMBatchGenerator:
    """Greedy generation of token ids with vLLM's offline ``LLM.generate`` in ``python``."""

    python: str
    model_dir: Path
    max_new_tokens: int
    stop_token_ids: Sequence[int]
    repetition_penalty: float = 1.0
    dtype: str = "float32"
    chunk: int = 256
    engine_args: dict = field(default_factory=dict)
    log_path: Path | None = None  # the child's output; default: a temporary file
    poll_s: float = 0.5

    def command(self, input_path: Path, output_path: Path) -> list[str]:
        return [self.python, str(RUNNER), "--model", str(self.model_dir), "--input", str(input_path),
                "--output", str(output_path), "--max-tokens", str(self.max_new_tokens),
                "--stop-token-ids", *map(str, self.stop_token_ids),
                "--repetition-penalty", repr(float(self.repetition_penalty)), "--dtype", self.dtype,
                "--chunk", str(self.chunk), "--engine-args", json.dumps(self.engine_args)]

    def generate(self, keys: Sequence[int], prompt_ids: Sequence[Sequence[int]],
                 on_chunk: Callable[[list[int], list[list[int]], float], None]) -> None:
        """Generate for every prompt; ``on_chunk(keys, token_ids, seconds)`` as chunks finish."""
        if not keys:
            return
        with tempfile.TemporaryDirectory(prefix="reclora-vllm-") as tmp:
            work = Path(tmp)
            with (work / "prompts.jsonl").open("w", encoding="utf-8") as f:
                for key, ids in zip(keys, prompt_ids):
                    f.write(json.dumps({"key": int(key), "prompt_token_ids": [int(t) for t in ids]}) + "\n")
            output = work / "results.jsonl"
            output.touch()
            log_path = self.log_path or work / "vllm.log"
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
            env.pop("PYTHONPATH", None)  # this environment's packages must not shadow vLLM's
            with log_path.open("ab") as log:
                process = subprocess.Popen(self.command(work / "prompts.jsonl", output), stdout=log,
                                           stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                self._follow(process, output, on_chunk)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if process.returncode != 0:
                raise VLLMGenerationError(f"vLLM generation exited with {process.returncode}:\n{_tail(log_path)}")

    def _follow(self, process: subprocess.Popen, output: Path,
                on_chunk: Callable[[list[int], list[list[int]], float], None]) -> None:
        with output.open(encoding="utf-8") as f:
            pending = ""
            while True:
                pending += f.readline()
                if pending.endswith("\n"):
                    chunk = json.loads(pending)
                    pending = ""
                    on_chunk([int(k) for k in chunk["keys"]], chunk["token_ids"], float(chunk["seconds"]))
                elif process.poll() is not None:
                    *complete, _partial = (pending + f.read()).split("\n")  # a torn last line is dropped
                    for line in filter(None, complete):
                        chunk = json.loads(line)
                        on_chunk([int(k) for k in chunk["keys"]], chunk["token_ids"], float(chunk["seconds"]))
                    return
                else:
                    time.sleep(self.poll_s)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
