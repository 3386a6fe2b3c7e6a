"""The Laser sample-efficiency study: every model trained on growing seeded shares of the train split.

Laser claims that LLMs recommend well from few samples and that LLM knowledge makes a CRM
sample-efficient. Each run trains one model on one seeded training subset (``subsets.py``),
selects it on validation (the CRM's early stopping, the LLM's best validation checkpoint) and
scores it on the seeded test subset ``reclora llm-report`` uses, so the figures of both commands
compare. Every finished run is one JSON file under ``runs/``; a rerun skips those whose settings
match, so a long study can be interrupted and continued.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training.baselines import LogisticBaseline, popularity_scores
from training.crm.dataset import encode_samples
from training.crm.knowledge import KnowledgeArrays
from training.crm.train import TrainConfig, TrainedCRM, predict, train_crm
from training.data.samples import PreparedData
from training.llm.crm_outputs import CRMOutputs, FrozenCRM
from training.llm.train import LLMTrainConfig
from training.metrics import binary_metrics
from training.slices import SampleSlices, slice_aucs
from training.studies.subsets import shared_test_subset, subset_size, train_subset

MODELS = {
    "popularity": "item popularity",
    "logistic": "logistic regression",
    "crm": "CRM",
    "crm_knowledge": "CRM + knowledge",
    "rella": "ReLLa-style LLM (shared LoRA)",
    "reclora": "RecLoRA LLM (personalized LoRA)",
}
CRM_SIDE = ("popularity", "logistic", "crm", "crm_knowledge")
LLM_MODELS = ("reclora", "rella")
RUNS_DIR = "runs"


def crm_defaults() -> TrainConfig:
    """The CRM as ``reclora train-crm`` trains it by default, so the full-data run is that CRM."""
    return TrainConfig(epochs=20, batch_size=1024, lr=2e-3, weight_decay=1e-4, patience=3, progress=False,
                       model=dict(emb_dim=16, dropout=0.2, l_long=1000, l_crm=60))


def llm_defaults() -> LLMTrainConfig:
    return LLMTrainConfig(lora=dict(r=8, lora_alpha=16.0, temperature=1.0), objective="answer")  # the LLM alone


@dataclass
class StudyConfig:
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 1.0)
    crm_models: tuple[str, ...] = CRM_SIDE  # a subset runs part of the study (e.g. in a second process)
    seeds: tuple[int, ...] = (0, 1, 2)  # at fractions up to ``many_seeds_up_to``
    seeds_above: tuple[int, ...] = (0,)  # at larger fractions
    many_seeds_up_to: float = 0.1
    n_test: int = 2000
    test_seed: int = 0
    crm: TrainConfig = field(default_factory=crm_defaults)  # seed and batch size are set per run
    min_batches_per_epoch: int = 20  # small subsets train with smaller batches (see ``crm_batch_size``)
    llm_samples: tuple[int, ...] = (64, 256, 1024)
    llm_models: tuple[str, ...] = LLM_MODELS
    llm_seeds: tuple[int, ...] | None = None  # None: as the CRM side, by the share N is of the train split
    llm: LLMTrainConfig = field(default_factory=llm_defaults)  # n_samples, seed and the mode are set per run
    score_dtype: str = "float32"  # the LLM's test scoring, as ``llm-report`` scores
    score_batch_size: int = 16
    progress: bool = True


@dataclass
class StudyInputs:
    data: PreparedData
    embeddings: np.ndarray
    knowledge: KnowledgeArrays | None = None
    knowledge_dir: Path | None = None
    crm_dir: Path | None = None  # full-data CRM whose user vectors the LLM reads; None: no LLM runs
    base_dir: Path | None = None


@dataclass(frozen=True)
class Run:
    model: str
    n_train: int
    fraction: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}-n{self.n_train}-s{self.seed}"


def crm_batch_size(cfg: StudyConfig, n_train: int) -> int:
    """The configured batch, smaller where a subset would give fewer than ``min_batches_per_epoch``.

    Early stopping counts epochs: a 1% subset in batches of 1024 is one optimizer step per epoch,
    so it would stop after a handful of steps and measure the step budget, not the data.
    """
    return max(1, min(cfg.crm.batch_size, max(16, math.ceil(n_train / max(cfg.min_batches_per_epoch, 1)))))


def seeds_for(cfg: StudyConfig, fraction: float, llm: bool = False) -> tuple[int, ...]:
    if llm and cfg.llm_seeds is not None:
        return cfg.llm_seeds
    return cfg.seeds if fraction <= cfg.many_seeds_up_to + 1e-12 else cfg.seeds_above


def plan_runs(cfg: StudyConfig, n_train_total: int, *, knowledge: bool, llm: bool) -> list[Run]:
    """Every run of the study, cheap models and small subsets first."""
    unknown = sorted(set(cfg.llm_models) - set(LLM_MODELS))
    if unknown:
        raise ValueError(f"unknown LLM model(s) {', '.join(unknown)}: choose from {', '.join(LLM_MODELS)}")
    if not cfg.fractions:
        raise ValueError("the study needs at least one training fraction")
    if not cfg.seeds or not cfg.seeds_above:
        raise ValueError("the study needs at least one seed at every fraction")
    unknown = sorted(set(cfg.crm_models) - set(CRM_SIDE))
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(CRM_SIDE)}")
    models = [m for m in CRM_SIDE if m in cfg.crm_models and (knowledge or m != "crm_knowledge")]
    runs = []
    for fraction in sorted(set(cfg.fractions)):
        n = subset_size(fraction, n_train_total)
        runs += [Run(m, n, fraction, s) for s in seeds_for(cfg, fraction) for m in models]
    if llm:
        for n in sorted(set(cfg.llm_samples)):
            if not 1 <= n <= n_train_total:
                raise ValueError(f"--llm-samples {n} is outside 1..{n_train_total} (the train split's samples)")
            fraction = n / n_train_total
            runs += [Run(m, n, fraction, s) for s in seeds_for(cfg, fraction, llm=True) for m in cfg.llm_models]
    return runs


def check_subsets(data: PreparedData, runs: list[Run]) -> None:
    """Refuse up front, not hours in, a training subset with one class only."""
    for n, seed in sorted({(r.n_train, r.seed) for r in runs}):
        labels = train_subset(data, n, seed).split("train")["label"]
        if labels.nunique() < 2:
            raise ValueError(f"the {n}-sample training subset of seed {seed} has one class only: "
                             "use larger fractions or more --llm-samples")


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def settings_for(model: str, cfg: StudyConfig, inputs: StudyInputs) -> dict:
    """What a run's result depends on beyond (model, n, seed): a finished run is reused only if equal."""
    settings: dict = {"n_test": cfg.n_test, "test_seed": cfg.test_seed, "dataset": inputs.data.meta.get("dataset"),
                      "n_samples": inputs.data.meta.get("n_samples"), "embedding_dim": int(inputs.embeddings.shape[1])}
    if model in ("crm", "crm_knowledge"):
        crm = {k: v for k, v in dataclasses.asdict(cfg.crm).items() if k not in ("seed", "progress", "threads")}
        settings.update(crm=crm, min_batches_per_epoch=cfg.min_batches_per_epoch)
    if model == "crm_knowledge":
        settings["knowledge"] = {"dir": str(inputs.knowledge_dir),
                                 "meta": None if inputs.knowledge is None else inputs.knowledge.meta}
    if model in LLM_MODELS:
        llm = {k: v for k, v in dataclasses.asdict(cfg.llm).items() if k not in ("n_samples", "seed", "progress")}
        settings.update(llm=llm, crm_dir=str(inputs.crm_dir), base_model=str(inputs.base_dir),
                        score_dtype=cfg.score_dtype)
    return _jsonable(settings)


def _write_json(path: Path, value: object) -> None:
    """Written whole or not at all: an interrupted study never leaves half a run behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class _Runner:
    """Trains and scores one run; holds what every run shares (test subset, its encodings, user vectors)."""

    def __init__(self, cfg: StudyConfig, inputs: StudyInputs, out_dir: Path) -> None:
        self.cfg, self.inputs, self.out_dir = cfg, inputs, out_dir
        self.test = shared_test_subset(inputs.data, cfg.n_test, cfg.test_seed)
        self.labels = self.test["label"].to_numpy()
        self.slices = SampleSlices.of(inputs.data, self.test)
        self._encoded: dict[str, object] = {}
        self._test_crm: CRMOutputs | None = None  # the full-data CRM's vectors of the test subset
        self._test_prompts: dict[str, list[list[int]]] = {}

    def __call__(self, run: Run) -> dict:
        view = train_subset(self.inputs.data, run.n_train, run.seed)
        if run.model in LLM_MODELS:
            return self._llm(run, view)
        return getattr(self, f"_{run.model}")(run, view)

    # ---- CRM side: the full test split as well, since it costs little ----------------------------

    def _from_split_scores(self, view: PreparedData, scores: Callable[[str], np.ndarray]) -> dict:
        valid, test_full = scores("valid"), scores("test")
        full = binary_metrics(view.split("test")["label"].to_numpy(), test_full)
        return {"valid_auc": binary_metrics(view.split("valid")["label"].to_numpy(), valid)["auc"],
                **self._test_metrics(test_full[self.test.index.to_numpy()]),
                "test_full_auc": full["auc"], "test_full_logloss": full["logloss"]}

    def _popularity(self, run: Run, view: PreparedData) -> dict:
        return self._from_split_scores(view, lambda split: popularity_scores(view, split))

    def _logistic(self, run: Run, view: PreparedData) -> dict:
        return self._from_split_scores(view, LogisticBaseline(view).fit().predict)

    def _crm(self, run: Run, view: PreparedData) -> dict:
        return self._train_crm(run, view, None)

    def _crm_knowledge(self, run: Run, view: PreparedData) -> dict:
        if self.inputs.knowledge is None:
            raise ValueError("CRM + knowledge runs need the knowledge arrays (--knowledge)")
        return self._train_crm(run, view, self.inputs.knowledge)

    def _train_crm(self, run: Run, view: PreparedData, knowledge: KnowledgeArrays | None) -> dict:
        batch = crm_batch_size(self.cfg, run.n_train)
        cfg = dataclasses.replace(self.cfg.crm, seed=run.seed, batch_size=batch)
        trained = train_crm(view, self.inputs.embeddings, cfg, knowledge=knowledge)
        probs = predict(trained.model, self._encoded_test(view, trained, knowledge))
        return {"valid_auc": trained.metrics["valid"]["auc"], **self._test_metrics(probs),
                "test_full_auc": trained.metrics["test"]["auc"], "test_full_logloss": trained.metrics["test"]["logloss"],
                "details": {"epochs": len(trained.history), "batch_size": batch,
                            "best_epoch": 1 + int(np.argmax([h["valid_auc"] for h in trained.history]))}}

    def _encoded_test(self, view: PreparedData, trained: TrainedCRM, knowledge: KnowledgeArrays | None):
        """The test subset encoded once per CRM architecture (feature spaces come from the full tables)."""
        key = trained.config.model_dump_json() + trained.space.model_dump_json() + str(knowledge is not None)
        if key not in self._encoded:
            emb = torch.from_numpy(np.asarray(self.inputs.embeddings, np.float32))
            users = None if knowledge is None else knowledge.user_table()
            self._encoded[key] = encode_samples(view, self.test, trained.space, trained.config, emb,
                                                progress=False, user_knowledge=users)
        return self._encoded[key]

    # ---- LLM alone ------------------------------------------------------------------------------

    def _llm(self, run: Run, view: PreparedData) -> dict:
        from service.crm.model import CRMConfig
        from training.llm.loading import load_trained
        from training.llm.train import train_llm

        inputs, cfg = self.inputs, self.cfg
        if inputs.crm_dir is None or inputs.base_dir is None:
            raise ValueError("LLM runs need the full-data CRM checkpoint and the base model")
        user_dim = CRMConfig.model_validate_json((inputs.crm_dir / "config.json").read_text()).user_dim
        mode = {"n_meta": 1, "gated": False} if run.model == "rella" else {"gated": True}
        lora = {"n_meta": 8, **cfg.llm.lora, **mode, "user_dim": user_dim}
        llm_cfg = dataclasses.replace(cfg.llm, n_samples=run.n_train, seed=run.seed, lora=lora,
                                      progress=cfg.progress)
        out = self.out_dir / "llm" / run.key
        summary = train_llm(view, inputs.embeddings, inputs.crm_dir, inputs.base_dir, out, llm_cfg)
        scorer = load_trained(out, inputs.base_dir, cfg.score_dtype, llm_cfg.k_text, device=llm_cfg.device)
        if self._test_crm is None:
            self._test_crm = FrozenCRM.load(inputs.crm_dir, inputs.data, inputs.embeddings).outputs(self.test)
        wording = scorer.builder_for(inputs.data).config.model_dump_json()
        if wording not in self._test_prompts:
            self._test_prompts[wording] = scorer.prompts(inputs.data, self.test, inputs.embeddings, "semantic")
        probs = scorer.score(self._test_prompts[wording], self._test_crm.user_reps, cfg.score_batch_size,
                             item_reps=self._test_crm.item_reps if llm_cfg.collab_tokens else None)
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"valid_auc": summary["best_valid_auc"], **self._test_metrics(probs),
                "details": {"instances": summary["instances"], "train_seconds": summary["train_seconds"],
                            "valid_samples": llm_cfg.valid_samples, "lora": str(out.relative_to(self.out_dir))}}

    def _test_metrics(self, probs: np.ndarray) -> dict:
        m = binary_metrics(self.labels, probs)
        return {"test_auc": m["auc"], "test_logloss": m["logloss"], "test_acc": m["acc"],
                "test_slices": slice_aucs(self.labels, probs, self.slices)}


def run_study(inputs: StudyInputs, cfg: StudyConfig, out_dir: Path,
              on_progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run (or continue) the study in ``out_dir``; returns one row per run, finished ones included.

    ``on_progress(rows)`` is called after every newly finished run (the report is rewritten there).
    """
    n_train_total = int((inputs.data.samples["split"] == "train").sum())
    llm = bool(cfg.llm_models) and bool(cfg.llm_samples) and inputs.crm_dir is not None
    runs = plan_runs(cfg, n_train_total, knowledge=inputs.knowledge is not None, llm=llm)
    check_subsets(inputs.data, runs)
    runs_dir = out_dir / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(cfg, inputs, out_dir)
    rows: list[dict] = []
    bar = tqdm(runs, desc="sample-efficiency runs", disable=not cfg.progress)
    for i, run in enumerate(bar, 1):
        path = runs_dir / f"{run.key}.json"
        settings = settings_for(run.model, cfg, inputs)
        if path.is_file():
            row = json.loads(path.read_text())
            if row.get("settings") != settings:
                changed = sorted(k for k in settings.keys() | row.get("settings", {}).keys()
                                 if settings.get(k) != row.get("settings", {}).get(k))
                raise ValueError(f"{path} was made with other settings ({', '.join(changed)}): "
                                 "use another --out, or delete that run to redo it")
            rows.append(row)
            bar.write(f"[{i}/{len(runs)}] {run.key}: done before, skipped")
            continue
        start = time.perf_counter()
        result = runner(run)
        row = {"model": run.model, "label": MODELS[run.model], "fraction": run.fraction,
               "n_train_samples": run.n_train, "seed": run.seed, **result,
               "wall_seconds": time.perf_counter() - start, "settings": settings}
        _write_json(path, row)
        rows.append(row)
        bar.write(f"[{i}/{len(runs)}] {run.key}: test AUC {row['test_auc']:.4f}, valid AUC {row['valid_auc']:.4f}, "
                  f"{row['wall_seconds']:.1f} s")
        if on_progress is not None:
            on_progress(rows)
    bar.close()
    return rows


def protocol_summary(inputs: StudyInputs, cfg: StudyConfig) -> dict:
    """What the report says about the shared protocol."""
    test = shared_test_subset(inputs.data, cfg.n_test, cfg.test_seed)
    return {"n_test": len(test), "test_seed": cfg.test_seed,
            "n_train_total": int((inputs.data.samples["split"] == "train").sum()),
            "n_test_full": int((inputs.data.samples["split"] == "test").sum()),
            "llm_valid_samples": cfg.llm.valid_samples, "llm_prompt_form": cfg.llm.prompt_form,
            "llm_request_size": cfg.llm.request_size, "llm_collab_tokens": cfg.llm.collab_tokens}

