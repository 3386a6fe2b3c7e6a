"""Tokens per request of the two prompt forms, for one user of a prepared dataset.

The per-target form (ReLLa's SUBR) puts each candidate's own K_text retrieved behaviours in its
suffix; the shared form retrieves K_text behaviours once for the candidate set and puts them in
the prefix, which the engine runs once a request. For one user with a real history and N
candidates (the items the user rated last, then catalog items the user never rated), this prints
the prefix and suffix token counts of both forms and the tokens the engine runs per request
(prefix once + every suffix), with the serving stages' own retrieval and prompt builder.

    python benchmarks/prompt_tokens.py --data work/ml-100k --tokenizer BASE_MODEL_DIR [--user 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service.llm.prompt import Behaviour, PromptBuilder, PromptConfig
from service.retrieval.history import semantic_positions, shared_positions
from training.data.samples import PreparedData
from training.llm.prompts import catalog_texts, prompt_config_for, user_profiles


def request(data: PreparedData, user_position: int,
            n_candidates: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(user, history items, ratings, candidates): the user at ``user_position`` among those with
    the longest histories, the candidates their last rated items and then items they never rated."""
    events = data.events.sort_values([c for c in ("user_idx", "timestamp", "order") if c in data.events])
    counts = events["user_idx"].value_counts()
    user = int(counts.index[user_position])
    mine = events[events["user_idx"] == user]
    held_out = min(n_candidates // 2, len(mine) // 4)
    history, last = mine.iloc[: len(mine) - held_out], mine.iloc[len(mine) - held_out :]
    unseen = np.setdiff1d(data.items["item_idx"].to_numpy(), mine["item_idx"].to_numpy())
    rng = np.random.default_rng(0)
    unrated = rng.choice(unseen, n_candidates - held_out, replace=False)
    candidates = np.concatenate([last["item_idx"].to_numpy(), unrated])
    return user, history["item_idx"].to_numpy(np.int64), history["rating"].to_numpy(np.float32), candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (with embeddings.npy)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a base model or tokenizer directory")
    parser.add_argument("--user", type=int, default=0, help="rank of the user by history length (0: longest)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--k-text", type=int, default=10)
    parser.add_argument("--engine", type=Path, help=(
        "a bundle directory with an LLM part: also time the embedded engine (the --tokenizer directory is "
        "its base model) on both forms' prompts with the user's adapter, in the same run, and against its floor"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    data = PreparedData.load(args.data)
    embeddings = np.load(args.data / "embeddings.npy", allow_pickle=False)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = catalog_texts(data.items)
    user, items, ratings, candidates = request(data, args.user, args.candidates)
    profile = user_profiles(data.users)[user]
    targets = [texts[int(c)] for c in candidates]

    def behaviours(positions: np.ndarray) -> list[Behaviour]:
        return [Behaviour(texts[int(items[p])], float(ratings[p])) for p in positions]

    words = prompt_config_for(data.meta).wording()
    per_target = PromptBuilder(tokenizer, PromptConfig(**words))
    shared = PromptBuilder(tokenizer, PromptConfig(**words, form="shared"))
    own = [behaviours(p) for p in semantic_positions(items, candidates, embeddings, args.k_text)]
    one = behaviours(shared_positions(items, candidates, embeddings, args.k_text))
    forms = {"per-target": per_target.encode(profile, own, targets),
             "shared": shared.encode_shared(profile, one, targets)}
    print(f"user {user}: {len(items)} behaviours in the history, {len(candidates)} candidates, K_text {args.k_text}, "
          f"tokenizer {args.tokenizer.name}")
    print("| form | prefix | suffix mean | suffix max | tokens per request (prefix once + suffixes) |")
    print("|---|---|---|---|---|")
    for name, (prefix, suffixes) in forms.items():
        lengths = [len(s) for s in suffixes]
        print(f"| {name} | {len(prefix)} | {np.mean(lengths):.1f} | {max(lengths)} | {len(prefix) + sum(lengths)} |")
    if args.engine is not None:
        time_engine(args, forms, items, ratings, profile)


def time_engine(args, forms: dict, items: np.ndarray, ratings: np.ndarray, profile: dict) -> None:
    """Median milliseconds of the embedded engine (the gateway's dtype rule, 2 threads) scoring each
    form's prompts with the user's own adapter; the adapter's weights do not change the work."""
    import time

    import torch

    from service.api.wiring import build_torch_engine
    from service.config import Settings
    from service.model import load_model
    from service.scoring.stages import UserHistoryView, run_crm, user_adapter

    torch.set_num_threads(2)
    model = load_model(args.engine)
    settings = Settings(base_model_dir=args.tokenizer, model_store=args.engine.parent, active_version=args.engine.name)
    engine, _ = build_torch_engine(settings, model)
    raw = model.catalog.items.set_index("item_idx")["item"]
    view = UserHistoryView.from_raw(model, raw.loc[items].to_numpy(np.int64), ratings, profile)
    adapter = user_adapter(model, "bench", run_crm(model, view, model.catalog.to_dense([])).user_rep, None)
    from bench_score import WorkCounter, engine_flops, matmul_rate

    dtype = next(engine.model.parameters()).dtype
    config = engine.model.config
    print(f"engine ({dtype}), median of {args.repeats} after a warm-up; its floor: the FLOPs of the rows it "
          "ran over the matmul rate measured now at the model's shapes")
    for name, (prefix, suffixes) in forms.items():
        counter = WorkCounter()
        engine.observe_rows = counter
        engine.score(adapter, prefix, suffixes)
        engine.observe_rows = None
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.score(adapter, prefix, suffixes)
            times.append((time.perf_counter() - start) * 1000.0)
        rank = model.lora_config.r if model.lora_config is not None else 0
        floor_ms = engine_flops(config, rank, counter.work) / matmul_rate(
            config.hidden_size, config.intermediate_size, counter.work["tokens"], dtype) / 1e6
        print(f"  {name}: {np.median(times):.0f} ms per request of {len(suffixes)} candidates; floor "
              f"{floor_ms:.0f} ms ({np.median(times) / floor_ms:.2f}x)")


if __name__ == "__main__":
    main()
