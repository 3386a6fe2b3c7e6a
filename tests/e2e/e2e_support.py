"""Helpers of the end-to-end suite: the world description, the float32 LLM reference, uvicorn on a
loopback port, the error schema, Prometheus text.

Imported by ``conftest.py`` and the tests (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import socket
import sys
import tarfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from service.api import create_app
from service.api.server import DrainingServer, make_server
from service.config import Settings
from service.history import HistorySettings, HistoryStore, UserHistory
from service.model import Fusion, LoadedModel, load_model
from tests.http_support import assert_error, closed_port, wait_for  # noqa: F401  (re-exported for the tests)
from tests.redis_support import REDIS_URL  # noqa: F401  (re-exported for the tests)
from tests.world_support import EMBEDDING_DIM, FUSION, VERSION, World, train_lora  # noqa: F401  (re-exported)


@dataclass
class LiveServer:
    """The real app under uvicorn in a background thread, on a pre-bound 127.0.0.1 socket."""

    app: FastAPI
    server: DrainingServer
    thread: threading.Thread
    sock: socket.socket
    url: str

    @classmethod
    def start(cls, settings: Settings, *, model_timeout: float = 120.0, require_model: bool = True) -> "LiveServer":
        """Build the app (the lifespan builds its runtime from ``settings`` through
        ``service.api.wiring.build_runtime``), serve it, and wait until the model is loaded
        (or, with ``require_model=False``, until its load has finished either way)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        app = create_app(settings)
        server = make_server(settings, app)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="e2e-uvicorn")
        thread.start()
        host, port = sock.getsockname()
        live = cls(app, server, thread, sock, f"http://{host}:{port}")
        try:
            wait_for(lambda: server.started or not thread.is_alive(), 30.0, "uvicorn start")
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            state = app.state
            wait_for(lambda: state.scorer is not None or state.lifecycle.model_error is not None,
                     model_timeout, "model load")
            if require_model and state.lifecycle.model_error is not None:
                raise RuntimeError(f"model load failed: {state.lifecycle.model_error}")
        except BaseException:
            live.stop()
            raise
        return live

    def client(self, timeout: float = 60.0, token: str | None = None) -> httpx.Client:
        """An HTTP client of this server; with ``token``, an admin's (bearer token)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def stop(self) -> None:
        """Graceful shutdown: uvicorn drains, the lifespan closes the scorer and the history store."""
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not shut down within 30 s; its event loop awaits:\n" + self.loop_tasks()
                               + "\nthe threads were at:\n" + thread_stacks())

    def loop_tasks(self) -> str:
        """The stack of every task on the server's event loop: what an idle loop that does not stop awaits."""
        if not self.server.servers:
            return "(no event loop)"

        async def stacks() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks():
                task.print_stack(file=out)
            return out.getvalue()
        try:
            return asyncio.run_coroutine_threadsafe(stacks(), self.server.servers[0].get_loop()).result(5)
        except Exception as exc:  # the loop may be gone by now
            return f"(not read: {exc!r})"


def thread_stacks() -> str:
    """Every live thread's stack, to say what a shutdown that hangs waits on."""
    frames = sys._current_frames()
    return "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threading.enumerate() if t.ident in frames)


def tar_of(files: dict[str, bytes], *, gz: bool = False) -> bytes:
    """A tar archive (gzipped with ``gz``) of ``files``, as an admin upload carries bundle parts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def read_history(world: World, user: str) -> UserHistory:
    """The user's stored history, read back through the service's own store class."""

    async def read() -> UserHistory:
        store = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=world.prefix))
        try:
            return await store.read(user)
        finally:
            await store.aclose()

    return asyncio.run(read())


def metric_value(text: str, sample_name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    labels = labels or {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class Reference:
    """The LLM's P(Yes) recomputed in float32 without the serving engine."""

    def __init__(self, world: World, bundle_dir: Path | None = None) -> None:
        """On the world's bundle, or on ``bundle_dir`` (another bundle on the world's base model)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from service.llm.personalized_lora import PersonalizedLoRA
        from service.llm.prompt import PromptBuilder

        self.world = world
        bundle_dir = bundle_dir or world.bundle_dir
        self.model: LoadedModel = load_model(bundle_dir)  # this process's own copy of the bundle
        tokenizer = AutoTokenizer.from_pretrained(world.base_dir, local_files_only=True)
        self.builder = PromptBuilder(tokenizer, self.model.prompt)
        self.pad_id = tokenizer.pad_token_id
        self.llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32,
                                                        local_files_only=True).eval()
        self.lora = PersonalizedLoRA(self.llm, self.model.lora_config)
        self.lora.load_trainable_state_dict(load_file(bundle_dir / "lora" / "weights.safetensors"))
        self.lora.eval()  # gate dropout off, as when serving
        self.fusion: Fusion | None = self.model.fusion

    def view_of(self, items: np.ndarray, ratings: np.ndarray, profile: dict[str, str]):
        """A raw-id history as the serving stages see it."""
        from service.scoring.stages import UserHistoryView

        return UserHistoryView.from_raw(self.model, np.asarray(items, np.int64), np.asarray(ratings, np.float32),
                                        profile)

    def view(self, user_id: str, extra: Sequence[tuple[int, float]] = ()):
        """The user's history as loaded into Redis (plus ``extra`` (item, rating) behaviours)."""
        items, ratings, _, profile = self.world.histories.get(user_id, (np.zeros(0, np.int64),
                                                                         np.zeros(0, np.float32), None, {}))
        if extra:
            items = np.concatenate([items, np.asarray([i for i, _ in extra], np.int64)])
            ratings = np.concatenate([ratings, np.asarray([r for _, r in extra], np.float32)])
        return self.view_of(items, ratings, profile)

    def crm(self, user_id: str, candidates: Sequence[int], extra: Sequence[tuple[int, float]] = ()):
        return self.crm_of(self.view(user_id, extra), candidates)

    def crm_of(self, view, candidates: Sequence[int]):
        from service.scoring.stages import run_crm

        return run_crm(self.model, view, self.model.catalog.to_dense(candidates))

    def sequences(self, user_id: str, candidates: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """(prefix, suffixes) of the user's request, in the bundle's prompt form."""
        from service.scoring.stages import text_inputs

        prompts = text_inputs(self.builder, self.model, self.view(user_id), self.model.catalog.to_dense(candidates))
        return prompts.prefix, prompts.suffixes

    def llm_scores(self, user_id: str, candidates: Sequence[int], adapter_user: str | None = None) -> np.ndarray:
        """P(Yes) of ``user_id``'s prompts with the adapter of ``adapter_user`` (default: the same user)."""
        from training.llm.scoring import score_sequences

        rep = self.crm(adapter_user or user_id, candidates).user_rep.reshape(1, -1)
        prefix, suffixes = self.sequences(user_id, candidates)
        return score_sequences(self.llm, [prefix + s for s in suffixes], self.builder.yes_id, self.builder.no_id,
                               self.pad_id, rows_context=lambda rows: self.lora.user(rep)).numpy()

    def prompt_of(self, view, candidate: int) -> list[int]:
        """The full prompt (prefix + suffix ids) the serving stages build for one candidate."""
        from service.scoring.stages import text_inputs

        prompts = text_inputs(self.builder, self.model, view, self.model.catalog.to_dense([candidate]))
        return prompts.prefix + prompts.suffixes[0]

    def score_prompts(self, prompts: Sequence[Sequence[int]], user_reps: torch.Tensor) -> np.ndarray:
        """Float32 P(Yes) of full prompts, row i with the adapter of user representation ``user_reps[i]``."""
        from training.llm.scoring import score_sequences

        return score_sequences(self.llm, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               rows_context=lambda rows: self.lora.user(user_reps[rows])).numpy()


def engine_dtype(live: LiveServer) -> torch.dtype:
    """The floating-point type the live service's LLM engine runs in (``TorchSettings.torch_dtype``)."""
    return next(live.app.state.scorer.engine.model.parameters()).dtype


def llm_atol(dtype: torch.dtype) -> float:
    """How close the service's P(Yes) must be to the float32 reference (``Reference``).

    float32 engine: the same math, up to float32 rounding and the engine's reuse of the prefix KV
    cache instead of full-prompt forwards: 1e-4. bfloat16 engine (``torch_dtype`` bfloat16, or auto
    on GPUs / CPUs with native bfloat16): weights and activations keep ~3 significant digits, so
    hidden states and hence P(Yes) differ by up to several 1e-3 on the tiny model; 1e-2 leaves room
    for that rounding and stays well below the spread between two users' adapters (> 5e-2).
    """
    return 1e-4 if dtype == torch.float32 else 1e-2


def export_serving_crm(world: World, root: Path, store: Path, version: str) -> Path:
    """Export into ``store`` the world's LoRA beside a CRM that ranks validation well, with a fusion
    that ranks as the LLM alone does, so the export decides ``serve: crm``."""
    import json

    from tests.world_support import item_rate_crm
    from training.export.crm_bundle import export_crm_bundle
    from training.llm.fusion_fit import FusionOptions

    report = root / "report"
    report.mkdir()
    (report / "fusion.json").write_text(json.dumps({"w_llm": 1.0, "w_crm": 0.0, "bias": 0.0}))
    path = export_crm_bundle(world.data_dir, item_rate_crm(world, root / "crm"), store, version,
                             description="fusion worse than the CRM", llm_dir=world.root / "lora",
                             base_model=world.base_dir, llm_report=report,
                             fusion=FusionOptions(samples=200, dtype="float32"))
    assert json.loads((path / "fusion.json").read_text())["serve"] == "crm"
    return path


def export_shared_form(world: World, root: Path, version: str, *train_args: str, adjust=None) -> Path:
    """A store under ``root`` holding ``version``: the world's data, CRM and base model and a LoRA
    trained briefly on the shared prompt form by the CLI (``train_args`` added), its B factors
    perturbed so adapters differ, ``adjust(lora_dir)`` applied, exported serving fused."""
    from typer.testing import CliRunner

    from tests.world_support import LORA, perturb_lora_b
    from training.cli import app
    from training.export.crm_bundle import export_crm_bundle
    from training.llm.fusion_fit import FusionOptions

    args = ["train-llm", "--data", str(world.data_dir), "--base-model", str(world.base_dir),
            "--out", str(root / "lora"), "--crm", str(world.crm_dir), "--prompt-form", "shared", *train_args,
            "--n-samples", "8", "--k-text", "3", "--no-mixed",
            "--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--lr", "5e-3", "--valid-samples", "8",
            "--evals-per-epoch", "1", "--dtype", "float32", "--n-meta", str(LORA["n_meta"]), "--rank", str(LORA["r"]),
            "--temperature", str(LORA["temperature"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    perturb_lora_b(root / "lora")
    if adjust is not None:
        adjust(root / "lora")
    store = root / "store"
    export_crm_bundle(world.data_dir, world.crm_dir, store, version, description=f"shared prompt form {version}",
                      llm_dir=root / "lora", base_model=world.base_dir, llm_report=world.root / "report",
                      fusion=FusionOptions(samples=100, dtype="float32", serve="fused"))
    return store


@contextmanager
def serving_float32(world: World, store: Path, version: str) -> Iterator[LiveServer]:
    """A gateway serving ``version`` of ``store`` on the float32 engine with explain on, stopped after."""
    server = LiveServer.start(world.settings(model_store=store, active_version=version, torch_dtype="float32",
                                             explain_enabled=True))
    try:
        yield server
    finally:
        server.stop()
