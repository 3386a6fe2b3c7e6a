"""``reclora push / models / activate / rollback / delete / admin-token``: ship models to a running service;
``reclora canary / promote / abort / online-report``: roll a version out to a share of users first and
see how it does on live traffic."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.admin.client import AdminClient, AdminError
from training.cli_support import fail, timed

Url = Annotated[str, typer.Option(envvar="RECLORA_ADMIN_URL", help="the gateway's base URL")]
Token = Annotated[str, typer.Option(envvar="RECLORA_ADMIN_TOKEN", show_default=False,
                                    help="admin bearer token (or RECLORA_ADMIN_TOKEN)")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, token: str) -> AdminClient:
    """The admin client, or one line saying why the URL or token is unusable."""
    try:
        return AdminClient(url, token)
    except ValueError as exc:
        fail(str(exc))
        raise


def _call(what, *args, **kwargs):
    """``what(*args, **kwargs)``; a refusal by the service becomes one line and exit code 2."""
    try:
        return what(*args, **kwargs)
    except AdminError as exc:
        fail(str(exc))


def push(
    version: Annotated[str, typer.Argument(help="the new version's name (immutable once pushed)")],
    bundle: Annotated[Optional[Path], typer.Option(help="a whole bundle directory (from `reclora export`)")] = None,
    lora: Annotated[Optional[Path], typer.Option(help="parts: a `reclora train-llm` output directory")] = None,
    crm: Annotated[Optional[Path], typer.Option(help="parts: a CRM checkpoint directory")] = None,
    fusion: Annotated[Optional[Path], typer.Option(help="parts: a fusion.json to go with them")] = None,
    base: Annotated[Optional[str], typer.Option(help="parts: the version they go on (default: active)")] = None,
    activate: Annotated[bool, typer.Option(help="activate once the service has validated it")] = False,
    description: str = "",
    url: Url = DEFAULT_URL,
    token: Token = "",
) -> None:
    """Upload a bundle, or new LoRA / CRM parts on top of a served version; the service validates it."""
    from tqdm import tqdm

    from training.admin.client import parts_dir

    if (bundle is None) == (lora is None and crm is None):
        fail("push: give either --bundle DIR or parts (--lora DIR and/or --crm DIR)")
    with timed("push"), _client(url, token) as admin, tempfile.TemporaryDirectory() as tmp:
        source = bundle
        if source is None:
            try:
                source = parts_dir(lora, crm, fusion, Path(tmp) / "parts")
            except (ValueError, FileNotFoundError) as exc:
                fail(str(exc))
        with tqdm(unit="B", unit_scale=True, desc=f"upload {version}") as bar:
            def progress(sent: int, total: int) -> None:
                bar.total = total
                bar.update(sent - bar.n)

            result = _call(admin.push, source, version, parts=bundle is None, activate=activate, base=base,
                          description=description, progress=progress)
    for check in result["checks"]:
        typer.echo(f"  ok  {check}")
    state = f"active (was {result['previous']})" if result["activated"] else "stored, not active"
    typer.echo(f"{version}: validated in {result['seconds']:.2f} s, {state}")


def models(url: Url = DEFAULT_URL, token: Token = "",
           as_json: Annotated[bool, typer.Option("--json", help="print the raw answer")] = False) -> None:
    """List the service's model versions."""
    with _client(url, token) as admin:
        listing = _call(admin.models)
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    typer.echo(f"{'':2}{'version':<28}{'created':<22}{'size':>10}  components / metrics")
    for v in listing["versions"]:
        mark = "*" if v["active"] else ("~" if v.get("canary") else ("<" if v.get("previous") else " "))
        size = f"{(v.get('size_bytes') or 0) / 1e6:.1f} MB"
        metrics = ", ".join(f"{k}={val:.4f}" for k, val in _flat_metrics(v.get("metrics", {})).items())
        typer.echo(f"{mark:<2}{v['version']:<28}{(v.get('created_at') or '')[:19]:<22}{size:>10}  "
                   f"{','.join(v.get('components', {}))} {metrics}".rstrip())
    typer.echo("(* active, ~ canary candidate, < rollback target)")
    if listing.get("canary"):
        typer.echo(canary_line(listing["canary"]))


def canary_line(canary: dict) -> str:
    """The canary in one line: what runs, or how the last one ended and why."""
    mode = "shadowing" if canary["shadow"] else "serving"
    head = f"canary {canary['candidate']} {mode} {canary['percent']:g}% of users beside {canary['stable']}"
    if canary["status"] == "running":
        return f"{head}: running since {canary['started_at'][:19]}"
    if canary["status"] == "promoted":
        return f"{head}: promoted at {(canary.get('ended_at') or '')[:19]}"
    by = "the guard" + (f" ({canary['rail']})" if canary.get("rail") else "") if canary.get("ended_by") == "guard" \
        else "an operator"
    return f"{head}: aborted by {by} at {(canary.get('ended_at') or '')[:19]}: {canary.get('reason') or ''}".rstrip()


def activate(version: str, url: Url = DEFAULT_URL, token: Token = "") -> None:
    """Validate and serve VERSION; requests in flight finish on the version they started with."""
    with timed("activate"), _client(url, token) as admin:
        result = _call(admin.activate, version)
    typer.echo(f"{result['version']} active (was {result['previous']}), {result['seconds']:.2f} s")


def rollback(url: Url = DEFAULT_URL, token: Token = "") -> None:
    """Serve the previously active version again."""
    with timed("rollback"), _client(url, token) as admin:
        result = _call(admin.rollback)
    typer.echo(f"{result['version']} active again (was {result['previous']}), {result['seconds']:.2f} s")


def canary(
    version: Annotated[str, typer.Argument(help="the candidate version (in the service's store)")],
    percent: Annotated[float, typer.Option(help="share of users (0-100] assigned by a stable hash of their id")],
    shadow: Annotated[bool, typer.Option(help="score their requests in the background and record, do not serve")]
        = False,
    url: Url = DEFAULT_URL,
    token: Token = "",
) -> None:
    """Start a canary of VERSION (or change its share or mode); the guard rails watch it."""
    with timed("canary"), _client(url, token) as admin:
        status = _call(admin.canary, version, percent, shadow=shadow)
    typer.echo(canary_line(status["canary"]))


def promote(url: Url = DEFAULT_URL, token: Token = "") -> None:
    """Serve the running canary's candidate to every user."""
    with timed("promote"), _client(url, token) as admin:
        result = _call(admin.promote)
    typer.echo(f"{result['version']} active for everyone (was {result['previous']}), {result['seconds']:.2f} s")


def abort(reason: Annotated[str, typer.Option(help="recorded with the abort")] = "",
          url: Url = DEFAULT_URL, token: Token = "") -> None:
    """Return every user to the stable version."""
    with _client(url, token) as admin:
        status = _call(admin.abort, reason)
    typer.echo(canary_line(status["canary"]))


def online_report(
    window_s: Annotated[Optional[float], typer.Option(help="seconds back (default: the service's window)")] = None,
    bucket_s: Annotated[float, typer.Option(help="width of the time buckets of the plot")] = 60.0,
    png: Annotated[Optional[Path], typer.Option(help="write the metrics over time here")] = Path("online-report.png"),
    as_json: Annotated[bool, typer.Option("--json", help="print the raw answer")] = False,
    url: Url = DEFAULT_URL,
    token: Token = "",
) -> None:
    """Online AUC, LogLoss and calibration per version of the labelled served scores: a table and a PNG."""
    from training.admin.online_report import plot, table

    if window_s is not None and window_s <= 0 or bucket_s <= 0:
        fail("--window-s and --bucket-s must be positive")
    with _client(url, token) as admin:
        report = _call(admin.online, window_s=window_s, bucket_s=bucket_s)
    typer.echo(json.dumps(report, indent=2) if as_json else table(report))
    if png is not None:
        typer.echo(f"plot in {plot(report, png)}")


def delete_model(version: str, url: Url = DEFAULT_URL, token: Token = "") -> None:
    """Delete an inactive version from the service's store."""
    with _client(url, token) as admin:
        _call(admin.delete, version)
    typer.echo(f"{version} deleted")


def admin_token() -> None:
    """Make an admin token; configure its digest on the service, keep the token secret."""
    from service.api.admin.auth import new_token

    token, digest = new_token()
    typer.echo(f"token (give to ML engineers as RECLORA_ADMIN_TOKEN): {token}")
    typer.echo(f'service setting: RECLORA_ADMIN_TOKEN_SHA256=\'["{digest}"]\'')


def _flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the recorded metrics, for one line of a listing (at most four)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "auc" in key.lower():
            out[f"{prefix}{key}"] = float(value)
    return dict(list(out.items())[:4])


COMMANDS = {
    "push": push,
    "models": models,
    "activate": activate,
    "rollback": rollback,
    "delete-model": delete_model,
    "admin-token": admin_token,
    "canary": canary,
    "promote": promote,
    "abort": abort,
    "online-report": online_report,
}


def register(app: typer.Typer) -> None:
    """Add these commands to the ``reclora`` app."""
    for name, command in COMMANDS.items():
        app.command(name)(command)
