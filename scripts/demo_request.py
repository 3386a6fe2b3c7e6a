"""Talk to a running gateway for ``scripts/demo``: wait until it is ready, send a sample score request
and (``--explain``, on a gateway with RECLORA_EXPLAIN_ENABLED) print one candidate explained.

    python scripts/demo_request.py ready --port 8000 --timeout 120 [--pid PID] [--version demo-small]
    python scripts/demo_request.py score --port 8000 --user 196 --items 1-20 [--catalog work/ml-100k/items.parquet] \
        [--explain]

Standard library only (pandas, when importable, adds item titles to the ranking).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def _url(args: argparse.Namespace, path: str) -> str:
    return f"http://{args.host}:{args.port}{path}"


def _get_json(url: str, timeout: float) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ready(args: argparse.Namespace) -> int:
    """0 once /readyz answers 200 (with the expected version); 1 on timeout; 3 if the process died."""
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    while True:
        if args.pid is not None and not _alive(args.pid):
            print(f"\ngateway process {args.pid} exited", file=sys.stderr)
            return 3
        try:
            status, body = _get_json(_url(args, "/readyz"), timeout=2.0)
        except (OSError, ValueError) as exc:
            status, body, last = 0, {}, f"{type(exc).__name__}: {exc}"
        if status == 200:
            version = body.get("model_version")
            if args.version is None or version == args.version:
                if not args.quiet:
                    print(f"\nready: model {version}")
                return 0
            last = f"serving {version}, expected {args.version}"
            if args.pid is None:  # someone else's gateway: waiting will not change the version
                print(f"\n{last}", file=sys.stderr)
                return 1
        elif status:
            last = body.get("message", f"HTTP {status}")
        if time.monotonic() >= deadline:
            if not args.quiet:
                print(f"\nnot ready after {args.timeout:.0f} s: {last}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(".", end="", flush=True)
        time.sleep(args.interval)


def parse_items(text: str) -> list[int]:
    """'1-20' or '50,172,181' (or a mix, '1-5,50')."""
    items: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            items.extend(range(int(lo), int(hi) + 1))
        else:
            items.append(int(part))
    return items


def _titles(catalog: str | None) -> dict[int, str]:
    if not catalog or not os.path.isfile(catalog):
        return {}
    try:
        import pandas as pd

        items = pd.read_parquet(catalog, columns=["item", "title"])
    except Exception:  # titles are a nicety; the raw answer is printed regardless
        return {}
    return dict(zip(items["item"].astype(int), items["title"].astype(str)))


def _post(url: str, body: dict, timeout_s: float) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def score(args: argparse.Namespace) -> int:
    body = {"user_id": args.user, "candidates": parse_items(args.items), "deadline_ms": args.deadline_ms}
    url = _url(args, "/v1/score")
    print(f"POST {url}")
    print(json.dumps(body, indent=2))
    started = time.perf_counter()
    try:
        status, answer = _post(url, body, args.deadline_ms / 1000 + 30)
    except OSError as exc:
        print(f"request failed: {exc}", file=sys.stderr)
        return 1
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"\nHTTP {status} in {elapsed_ms:.0f} ms")
    print(json.dumps(answer, indent=2))
    if status != 200:
        return 1

    titles = _titles(args.catalog)
    ranked = sorted(answer["scores"], key=lambda s: s["score"], reverse=True)
    print(f"\nRanking for user {answer['user_id']} (model {answer['model_version']}"
          f"{', degraded: ' + ', '.join(answer['degraded_reasons']) if answer['degraded'] else ''}):")
    print(f"{'rank':>4}  {'item':>5}  {'score':>6}  {'llm':>6}  {'crm':>6}  title")
    for rank, s in enumerate(ranked, 1):
        llm = "-" if s["llm_score"] is None else f"{s['llm_score']:.3f}"
        print(f"{rank:>4}  {s['item_id']:>5}  {s['score']:6.3f}  {llm:>6}  {s['crm_score']:6.3f}  "
              f"{titles.get(s['item_id'], '')}")
    return explain(args, body, ranked[0]["item_id"]) if args.explain else 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def explain(args: argparse.Namespace, body: dict, item: int) -> int:
    """POST /v1/explain for the same request; print the top-ranked candidate taken apart."""
    url = _url(args, "/v1/explain")
    print(f"\nPOST {url} (the same body; nothing is served or stored)")
    try:
        status, answer = _post(url, body, args.deadline_ms / 1000 + 30)
    except OSError as exc:
        print(f"explain failed: {exc}", file=sys.stderr)
        return 1
    if status == 404:  # a gateway started without RECLORA_EXPLAIN_ENABLED=true (an earlier demo's)
        print("this gateway does not serve /v1/explain: restart it with RECLORA_EXPLAIN_ENABLED=true")
        return 0
    if status != 200:
        print(f"HTTP {status}: {json.dumps(answer)}")
        return 1
    c = next(c for c in answer["candidates"] if c["item_id"] == item)
    computed = "computed now" if answer["llm_computed"] else f"not computed: {answer['llm_reason']}"
    print(f"item {c['item_id']} {c['title']}: crm {_num(c['crm_score'])}, llm {_num(c['llm_score'])} ({computed}), "
          f"fused {_num(c['fused_score'])}, served {_num(c['served_score'])} (the version serves "
          f"'{answer['score_source']}')")
    if c["prompt_tokens"] is not None:
        print(f"prompt: {c['prompt_tokens']} tokens ({answer['prompt_form']} form, prefix {answer['prefix_tokens']}); "
              f"the {len(c['history'])} behaviours it read, in prompt order:")
        print(f"  {'rank':>4}  {'sim':>6}  {'rating':>6}  title")
        for b in c["history"]:
            print(f"  {b['rank']:>4}  {b['similarity']:6.3f}  {b['rating']:6.1f}  {b['title']}")
    adapter = answer["adapter"]
    if adapter is not None and adapter["mixture"] is not None:
        mixture = adapter["mixture"]
        top = ", ".join(f"#{w['meta_lora']} {w['weight']:.2f}" for w in mixture["averaged"]["top"])
        print(f"gate mixture (averaged over {mixture['averaged']['modules']} modules, {mixture['n_meta']} "
              f"meta-LoRAs): {top}" + (f"; served prototype {adapter['prototype']}" if adapter["prototype"] else ""))
    elif adapter is not None:
        print(f"adapter: {adapter['kind']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ready", help="wait until /readyz answers 200")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--pid", type=int, help="give up early when this process exits")
    p.add_argument("--version", help="also require this model version")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=ready)

    p = sub.add_parser("score", help="send one POST /v1/score and print request and answer")
    p.add_argument("--user", default="196")
    p.add_argument("--items", default="1-20", help="e.g. 1-20 or 50,172,181")
    p.add_argument("--deadline-ms", type=int, default=20000)
    p.add_argument("--catalog", help="items.parquet of the prepared dataset, for titles")
    p.add_argument("--explain", action="store_true", help="then POST /v1/explain and print the top candidate")
    p.set_defaults(func=score)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
