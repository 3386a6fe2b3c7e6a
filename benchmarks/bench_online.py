"""Online evaluation against offline truth: the ML-100K test period replayed in time order as
traffic, against a 50 % canary of two versions, on loopback, bounded by ``--max-events``.

For each test interaction (oldest first): a score request for that user with the true item among
sampled catalog items, then the interaction itself as an event (``POST /v1/events``), which
labels the score served for it. The test period's interactions without a sample (too short a
history) are appended as events only, so each history a gateway reads is exactly the sample's. Two gateways replay the same traffic at once, one with the
served-score log (and so the online evaluation) on, one with it off; each event goes to both in
a random order, so the latency comparison sees the same load. Each starts from the histories
before the test period (under a key prefix of its own) and its own copy of the store.

Reported: per version, the online AUC the gateway computes (``GET /admin/v1/online``) and the
offline AUC of exactly the labelled pairs, scored by the training code (``training.crm.train.
predict`` on the test samples, which carry each interaction's history) with the samples' own
labels; the largest difference between served and offline scores; p50/p99 request latency with
the log on and off; how many events joined a served score; the log's written/dropped counts.

    python benchmarks/bench_online.py --data work/ml-100k --store work/online-store \\
        --stable online-v1 --candidate online-v2 --max-events 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_support import metric, start_gateway, stop_gateway  # noqa: E402
from service.history import HistorySettings  # noqa: E402
from service.history.clients import sync_client  # noqa: E402


def load_histories(store: HistorySettings, data, prefix: str) -> None:
    from service.history import bulk_load
    from training.history_loader import histories_from_prepared

    records = list(histories_from_prepared(data, until_split="test"))
    bulk_load(store, records, prefix=prefix, progress=False, total=len(records))


def offline_scores(data, embeddings: np.ndarray, crm_dir: Path, samples) -> np.ndarray:
    """The training code's P(click) of these test samples (each with its own history)."""
    import torch

    from training.crm.checkpoint import load_checkpoint, load_user_knowledge
    from training.crm.dataset import encode_samples
    from training.crm.train import predict

    model, config, space = load_checkpoint(crm_dir, data.items, embeddings)
    encoded = encode_samples(data, samples, space, config, torch.from_numpy(np.asarray(embeddings, np.float32)),
                             user_knowledge=load_user_knowledge(crm_dir),
                             progress=False)
    with torch.no_grad():
        return predict(model, encoded)


async def replay(args, data, gateways: dict[str, str], token: str) -> dict:
    """Every test interaction as a score request then an event, to both gateways; latencies per mode."""
    from training.history_loader import split_start_order

    rng = np.random.default_rng(args.seed)
    test = data.split("test").sort_values("order").head(args.max_events)
    events = data.events[(data.events["order"] >= split_start_order(data, "test"))
                         & (data.events["order"] <= test["order"].max())].sort_values("order")
    scored = set(test["order"].tolist())
    raw_user = dict(zip(data.users["user_idx"], data.users["user"].astype(str)))
    raw_item = dict(zip(data.items["item_idx"], data.items["item"].astype(int)))
    catalog = data.items["item"].to_numpy(np.int64)
    latencies: dict[str, list[float]] = {mode: [] for mode in gateways}
    versions: dict[str, dict[str, int]] = {mode: {} for mode in gateways}
    served_true: dict[str, list[float]] = {mode: [] for mode in gateways}
    refused: dict[str, int] = {mode: 0 for mode in gateways}
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    clients = {mode: httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) for mode, url in gateways.items()}
    try:
        for row in events.itertuples(index=False):
            user, item = raw_user[row.user_idx], raw_item[row.item_idx]
            event = {"user_id": user, "events": [{"item_id": item, "rating": float(row.rating),
                                                  "timestamp": int(row.timestamp)}]}
            if row.order not in scored:  # history only: no sample to score
                for mode, client in clients.items():
                    if (await client.post("/v1/events", json=event)).status_code != 200:
                        refused[mode] += 1
                continue
            others = rng.choice(catalog, args.candidates + 4, replace=False)
            candidates = [int(i) for i in others if i != item][: args.candidates - 1] + [item]
            rng.shuffle(candidates)
            for mode in rng.permutation(list(gateways)):
                client = clients[mode]
                start = time.perf_counter()
                r = await client.post("/v1/score", json={"user_id": user, "candidates": candidates})
                latencies[mode].append((time.perf_counter() - start) * 1000.0)
                r.raise_for_status()
                body = r.json()
                versions[mode][body["model_version"]] = versions[mode].get(body["model_version"], 0) + 1
                served_true[mode].append(body["scores"][candidates.index(item)]["score"])
                e = await client.post("/v1/events", json=event)
                if e.status_code != 200:
                    refused[mode] += 1
    finally:
        for client in clients.values():
            await client.aclose()
    return {"n": len(test), "history_only_events": len(events) - len(test), "latencies": latencies, "versions": versions, "served_true": served_true,
            "refused_events": refused, "test": test}


def summary_ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("work/ml-100k"))
    parser.add_argument("--store", type=Path, default=Path("work/online-store"))
    parser.add_argument("--stable", default="online-v1")
    parser.add_argument("--candidate", default="online-v2")
    parser.add_argument("--percent", type=float, default=50.0)
    parser.add_argument("--max-events", type=int, default=3000)
    parser.add_argument("--candidates", type=int, default=20, help="per request, the true item included")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-cluster", action="store_true", help="--redis-url names a seed node of a cluster")
    parser.add_argument("--port", type=int, default=18710)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/bench-online.json"))
    args = parser.parse_args()

    from service.api.admin.auth import new_token
    from training.data.samples import PreparedData
    from training.metrics import binary_metrics

    data = PreparedData.load(args.data)
    embeddings = np.load(args.data / "embeddings.npy", allow_pickle=False)
    token, digest = new_token()
    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    run = uuid.uuid4().hex[:8]
    prefixes = {mode: f"bench-online:{run}:{mode}:" for mode in ("on", "off")}
    procs = {}
    store_settings = HistorySettings(redis_url=args.redis_url, redis_cluster=args.redis_cluster)
    r = sync_client(store_settings)
    try:
        gateways = {}
        for k, mode in enumerate(("on", "off")):
            store = tmp / mode / "store"
            for version in (args.stable, args.candidate):
                shutil.copytree(args.store / version, store / version)
            (store / "ACTIVE").write_text(f"{args.stable}\n")
            load_histories(store_settings, data, prefixes[mode])
            port = args.port + k
            procs[mode] = start_gateway(port, tmp / f"gateway-{mode}.log", {
                "model_store": store, "redis_url": args.redis_url, "redis_cluster": str(args.redis_cluster).lower(), "redis_prefix": prefixes[mode],
                "admin_enabled": "true", "admin_token_sha256": json.dumps([digest]), "model_poll_s": "0",
                "served_log": "true" if mode == "on" else "false", "canary_guard": "false",
                "online_max_labels": str(max(args.max_events * 2, 1000)),
                "log_level": "WARNING", "llm_score_cache": "false"})
            gateways[mode] = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=gateways[mode], timeout=120,
                              headers={"Authorization": f"Bearer {token}"}) as admin:
                answer = admin.post("/admin/v1/canary", json={"version": args.candidate, "percent": args.percent})
                answer.raise_for_status()
        wall = time.perf_counter()
        result = asyncio.run(replay(args, data, gateways, token))
        wall = time.perf_counter() - wall

        with httpx.Client(base_url=gateways["on"], timeout=120, headers={"Authorization": f"Bearer {token}"}) as admin:
            labels_key = f"{prefixes['on']}online:labels"  # the gateways' default: one shard
            previous, settle = -1, time.monotonic() + 30
            while time.monotonic() < settle and r.xlen(labels_key) != previous:
                previous = r.xlen(labels_key)
                time.sleep(1.0)
            report = admin.get("/admin/v1/online", params={"window_s": 86_400, "bucket_s": 3600}).json()
            text = admin.get("/metrics").text
        rows = r.xrange(labels_key)
        pairs = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]

        test = result["test"]
        index = {(str(u), int(i)): n for n, (u, i) in enumerate(zip(
            test["user_idx"].map(dict(zip(data.users["user_idx"], data.users["user"].astype(str)))),
            test["item_idx"].map(dict(zip(data.items["item_idx"], data.items["item"].astype(int))))))}
        online = {m["version"]: m for m in report["versions"]}
        per_version = {}
        for version in (args.stable, args.candidate):
            mine = [p for p in pairs if p["v"] == version and p["sh"] == "0"]
            rows_idx = [index[(p["u"], int(p["i"]))] for p in mine]
            samples = test.iloc[rows_idx]
            offline = offline_scores(data, embeddings, args.store / version / "crm", samples)
            served = np.asarray([float(p["s"]) for p in mine])
            offline_m = binary_metrics(samples["label"].to_numpy(), offline)
            label_agree = float(np.mean(samples["label"].to_numpy() == np.asarray([int(p["y"]) for p in mine])))
            per_version[version] = {
                "labels": len(mine), "online_auc": online.get(version, {}).get("auc"),
                "offline_auc_same_pairs": offline_m["auc"],
                "auc_difference": abs((online.get(version, {}).get("auc") or float("nan")) - offline_m["auc"]),
                "online_logloss": online.get(version, {}).get("logloss"), "offline_logloss": offline_m["logloss"],
                "online_mean_predicted": online.get(version, {}).get("mean_predicted"),
                "online_positive_rate": online.get(version, {}).get("positive_rate"),
                "max_abs_served_minus_offline_score": float(np.max(np.abs(served - offline))) if len(mine) else None,
                "label_agreement_with_samples": label_agree,
            }
        on, off = summary_ms(result["latencies"]["on"]), summary_ms(result["latencies"]["off"])
        same = np.asarray(result["served_true"]["on"]) - np.asarray(result["served_true"]["off"])
        out = {
            "events": result["n"], "history_only_events": result["history_only_events"],
            "candidates_per_request": args.candidates, "percent": args.percent,
            "versions_served": result["versions"], "refused_events": result["refused_events"],
            "per_version": per_version,
            "latency_log_on": on, "latency_log_off": off, "p50_difference_ms": on["p50_ms"] - off["p50_ms"],
            "max_abs_score_on_minus_off": float(np.max(np.abs(same))),
            "labels_joined": metric(text, "reclora_online_labels_total", {"outcome": "joined"}),
            "events_unmatched": metric(text, "reclora_online_labels_total", {"outcome": "unmatched"}),
            "served_log_written": metric(text, "reclora_served_log_scores_total", {"outcome": "written"}),
            "served_log_dropped": metric(text, "reclora_served_log_scores_total", {"outcome": "dropped"}),
            "served_log_failed": metric(text, "reclora_served_log_scores_total", {"outcome": "failed"}),
            "stream_length": r.xlen(f"{prefixes['on']}online:served"), "wall_s": wall,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
    finally:
        for proc in procs.values():
            stop_gateway(proc)
        for prefix in prefixes.values():
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                r.delete(*keys[start:start + 1000])
        r.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
