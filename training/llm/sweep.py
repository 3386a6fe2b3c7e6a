"""A settings sweep of the personalized LoRA: train over a grid, select on validation, test once.

Every setting trains with ``train_llm`` into a directory of its own named by the setting; one whose
``train.json`` exists is read back instead of trained again, so an interrupted or extended sweep
resumes. The setting is selected on validation AUC (on the fused validation AUC with the fused
training objective, which selects its checkpoints on it too); only the selected one scores the
seeded test subset, once: its figures are kept with the name of the run they belong to. The table
(one row per run: settings, valid AUC, instances, train seconds) goes to ``sweep.md`` and
``sweep.json``, with the validation AUC's standard error and the runs the validation subset cannot
tell apart from the selected one (within two standard errors): a selection among those is a
draw, not a measurement.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from service.model.fusion import FUSION_FILE, Fusion
from training.data.samples import PreparedData
from training.llm.crm_outputs import FrozenCRM
from training.llm.fusion_fit import ValidationScores, decide, validation_subset
from training.llm.train import LLMTrainConfig
from training.metrics import auc_standard_error, binary_metrics

RUNS, TABLE_MD, TABLE_JSON, TEST_JSON = "runs", "sweep.md", "sweep.json", "test.json"


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    n_meta: int
    temperature: float
    n_samples: int
    epochs: int
    lr: float

    @property
    def name(self) -> str:
        return f"meta{self.n_meta}-temp{self.temperature:g}-n{self.n_samples}-ep{self.epochs}-lr{self.lr:g}"


@dataclass
class SweepConfig:
    """The grid (each axis a list of values) and what every run shares.

    ``n_samples`` entries are counts or percentages of the training split ("10%"). ``max_runs``
    keeps the first N settings of the grid in a seeded random order: the same order for the same
    grid and seed, so a larger N extends a sweep rather than starting another."""

    n_meta: Sequence[int] = (8, 16)
    temperature: Sequence[float] = (1.0, 5.0)
    n_samples: Sequence[str] = ("2048", "10%")
    epochs: Sequence[int] = (1,)
    lr: Sequence[float] = (1e-3,)
    max_runs: int | None = None
    seed: int = 0
    n_test: int = 2000
    template: LLMTrainConfig = field(default_factory=LLMTrainConfig)  # every other training setting


def parse_list(text: str, kind: Callable[[str], object], what: str) -> list:
    """A comma-separated flag as a list of values of ``kind``; a clear ValueError otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--{what} needs at least one value")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        name = getattr(kind, "__name__", "value")
        raise ValueError(f"--{what} must be comma-separated {name}s, got {text!r}") from None


def resolve_samples(value: str, n_train: int) -> int:
    """A training-sample count: an integer, or a percentage of the training split."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value.strip())
    count = round(float(match.group(1)) / 100.0 * n_train) if match else None
    if count is None:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"--n-samples takes counts or percentages (e.g. 2048,10%), got {value!r}") from None
    if not 1 <= count:
        raise ValueError(f"--n-samples {value!r} gives {count} samples; at least 1")
    return min(count, n_train)


def grid(config: SweepConfig, n_train: int) -> list[Setting]:
    """The settings to run, in run order (see ``SweepConfig``)."""
    samples = sorted({resolve_samples(v, n_train) for v in config.n_samples})
    settings = list(dict.fromkeys(Setting(m, float(t), n, e, float(lr)) for m, t, n, e, lr in itertools.product(
        config.n_meta, config.temperature, samples, config.epochs, config.lr)))
    bad = [s.name for s in settings if s.n_meta < 1 or s.temperature <= 0 or s.epochs < 1 or s.lr <= 0]
    if bad:
        raise ValueError(f"n_meta and epochs must be >= 1, temperature and lr > 0: {', '.join(bad)}")
    if config.max_runs is not None:
        if config.max_runs < 1:
            raise ValueError(f"--max-runs must be at least 1, got {config.max_runs}")
        order = np.random.default_rng(config.seed).permutation(len(settings))
        settings = [settings[i] for i in order[: config.max_runs]]
    return settings


def train_config(setting: Setting, config: SweepConfig) -> LLMTrainConfig:
    """``train_llm``'s config for one setting: the template with the setting's fields."""
    lora = {**config.template.lora, "n_meta": setting.n_meta, "temperature": setting.temperature, "gated": True}
    return replace(config.template, n_samples=setting.n_samples, epochs=setting.epochs, lr=setting.lr,
                   seed=config.seed, lora=lora)


def run_sweep(data_dir: Path, crm_dir: Path, base_dir: Path, out_dir: Path, config: SweepConfig,
              echo: Callable[[str], None] = print) -> dict:
    """Train every setting not trained yet, select one on validation, test it; returns the table."""
    from training.llm.train import train_llm

    config.template.check()
    data = PreparedData.load(data_dir)
    embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
    settings = grid(config, len(data.split("train")))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, setting in enumerate(settings, 1):
        run_dir = out_dir / RUNS / setting.name
        cfg = train_config(setting, config)
        if (run_dir / "train.json").is_file():
            summary, status = json.loads((run_dir / "train.json").read_text()), "resumed"
            changed = cfg.changed_from(summary["config"])
            if changed:
                raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}): "
                                 "sweep into another --out directory")
            echo(f"[{i}/{len(settings)}] {setting.name}: trained before, read back")
        else:
            echo(f"[{i}/{len(settings)}] {setting.name}: training")
            summary, status = train_llm(data, embeddings, crm_dir, base_dir, run_dir, cfg), "trained"
        row = table_row(setting, summary, status)
        rows.append(row)
        echo(f"    valid AUC {row['valid_auc']:.4f}" + (f", fused {row['valid_fused_auc']:.4f}"
                                                      if "valid_fused_auc" in row else "")
             + f", {row['instances']} instances, {row['train_seconds']:.0f} s")
    valid_labels = validation_subset(data, config.template.valid_samples, config.seed)["label"].to_numpy().astype(int)
    counts = (int(valid_labels.sum()), int(len(valid_labels) - valid_labels.sum()))
    for row in rows:
        row["valid_auc_se"] = auc_standard_error(selection_auc(row), *counts)
    best = max(rows, key=selection_auc)
    test = _test_once(data, embeddings, crm_dir, base_dir, out_dir, best, train_config(_setting(best), config), config)
    result = {"selected": best["run"], "selected_on": "valid_fused_auc" if "valid_fused_auc" in best else "valid_auc",
              "valid_samples": config.template.valid_samples, "valid_positives": counts[0],
              "valid_negatives": counts[1], "not_told_apart": not_told_apart(rows, best), "seed": config.seed,
              "rows": rows, "test": test,
              "template": asdict(config.template)}
    (out_dir / TABLE_JSON).write_text(json.dumps(result, indent=2))
    (out_dir / TABLE_MD).write_text(markdown(result))
    return result


def table_row(setting: Setting, summary: dict, status: str) -> dict:
    """A run's row: its settings and ``train_llm``'s summary. With the fused objective the best
    checkpoint's AUC is the fused one; the LLM's own comes from the same evaluation."""
    row = {"run": setting.name, **asdict(setting), "valid_auc": summary["best_valid_auc"],
           "instances": summary["instances"], "train_seconds": summary["train_seconds"], "status": status}
    if summary.get("objective") == "fused":
        best = max(summary["history"], key=lambda h: h["valid_auc"])
        row.update(valid_fused_auc=summary["best_valid_auc"], valid_auc=best["valid_llm_auc"])
    return row


def selection_auc(row: dict) -> float:
    return row.get("valid_fused_auc", row["valid_auc"])


def not_told_apart(rows: list[dict], best: dict) -> list[str]:
    """The other runs whose selection AUC is within two standard errors of the selected run's
    (the larger of the two errors): on this validation subset they may be as good."""
    return [r["run"] for r in rows if r is not best and selection_auc(best) - selection_auc(r)
            <= 2.0 * max(r["valid_auc_se"], best["valid_auc_se"])]


def _setting(row: dict) -> Setting:
    return Setting(row["n_meta"], row["temperature"], row["n_samples"], row["epochs"], row["lr"])


def _scores(scorer, data, embeddings, crm: FrozenCRM, samples) -> tuple[np.ndarray, np.ndarray]:
    """The run's LoRA's (``scorer``) and the CRM's P(like) of ``samples``, encoded once for both."""
    outputs = crm.outputs(samples)
    llm = scorer.score(scorer.prompts(data, samples, embeddings, "semantic"), outputs.user_reps,
                       item_reps=outputs.item_reps)
    return np.asarray(llm, np.float64), np.asarray(outputs.probabilities, np.float64)


def _test_once(data, embeddings, crm_dir, base_dir, out_dir: Path, best: dict, cfg: LLMTrainConfig,
               config: SweepConfig) -> dict:
    """The selected run on the seeded test subset: LLM, CRM and fused (fusion from validation) AUCs.
    Kept in test.json with the run's name; a later call with the same selection reads it back."""
    path = out_dir / TEST_JSON
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("run") == best["run"] and kept.get("n_test") == config.n_test and kept.get("seed") == config.seed:
            return kept
    from training.llm.loading import load_trained

    run_dir = out_dir / RUNS / best["run"]
    start = time.perf_counter()
    scorer = load_trained(run_dir, base_dir, cfg.dtype, cfg.k_text, cfg.device)
    crm = FrozenCRM.load(crm_dir, data, embeddings)
    valid = validation_subset(data, cfg.valid_samples, cfg.seed)
    valid_llm, valid_crm = _scores(scorer, data, embeddings, crm, valid)
    given = Fusion.from_json(json.loads((run_dir / FUSION_FILE).read_text())) if (run_dir / FUSION_FILE).is_file() \
        else None
    decision = decide(ValidationScores(valid_llm, valid_crm, valid["label"].to_numpy(), cfg.seed), given, "objective")
    test_split = data.split("test")
    test = test_split.sample(n=min(config.n_test, len(test_split)), random_state=config.seed)
    llm, crm_probs = _scores(scorer, data, embeddings, crm, test)
    labels = test["label"].to_numpy()
    result = {"run": best["run"], "n_test": config.n_test, "seed": config.seed, "n": len(test),
              "llm_auc": binary_metrics(labels, llm)["auc"], "crm_auc": binary_metrics(labels, crm_probs)["auc"],
              "fused_auc": binary_metrics(labels, decision.fusion(llm, crm_probs))["auc"],
              "serve": decision.fusion.serve, "fusion": decision.summary(),
              "seconds": time.perf_counter() - start}
    path.write_text(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    fused = any("valid_fused_auc" in r for r in result["rows"])
    head = ["run", "n_meta", "temperature", "samples", "epochs", "lr", "valid AUC",
            *(["valid fused AUC"] if fused else []), "± SE", "instances", "train s", "run status"]
    close = result["not_told_apart"]
    lines = [f"Selected on {result['selected_on']} ({result['valid_samples']} validation samples: "
             f"{result['valid_positives']} positive, {result['valid_negatives']} negative; seed "
             f"{result['seed']}): **{result['selected']}**. "
             + (f"Within two standard errors of it, so not told apart by this validation subset: "
                f"{', '.join(close)}." if close else "Every other run is more than two standard errors below it."),
             "", "SE: the selection AUC's standard error (Hanley and McNeil).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=selection_auc, reverse=True):
        cells = [r["run"], r["n_meta"], f"{r['temperature']:g}", r["n_samples"], r["epochs"], f"{r['lr']:g}",
                 f"{r['valid_auc']:.4f}"]
        if fused:
            cells.append(f"{r['valid_fused_auc']:.4f}" if "valid_fused_auc" in r else "")
        cells += [f"{r['valid_auc_se']:.4f}", r["instances"], f"{r['train_seconds']:.0f}", r["status"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    t = result["test"]
    lines += ["", f"Test subset ({t['n']} samples, seed {t['seed']}), selected run only: LLM AUC {t['llm_auc']:.4f}, "
                  f"CRM AUC {t['crm_auc']:.4f}, fused AUC {t['fused_auc']:.4f} (the fusion from the validation "
                  f"subset, which decides serve {t['serve']})."]
    return "\n".join(lines) + "\n"
