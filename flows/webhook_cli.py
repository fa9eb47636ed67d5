"""`lssf webhook serve`: the Hub webhook receiver (flows.webhook) under uvicorn.

FastAPI, uvicorn and Prefect are imported inside the handler, so that `lssf --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from lssf.commands import GROUP_HELP
from lssf.errors import ConfigError


def resolve_secret(env_var: str, block: str | None) -> str:
    """The shared secret: from a Prefect Secret block when named, else from `env_var`."""
    if block is not None:
        from prefect.blocks.system import Secret

        secret, origin = str(Secret.load(block).get()), f"Prefect Secret block {block!r}"
    else:
        secret, origin = os.environ.get(env_var, ""), f"environment variable {env_var}"
    if not secret:
        raise ConfigError(f"no webhook secret: {origin} is empty or unset")
    if not secret.isascii():
        raise ConfigError(f"webhook secret from {origin} is not ASCII (the Hub sends ASCII only)")
    return secret


# The URL path of the endpoint: absolute, plain characters, no `..` segment.
_URL_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+/?")
MAX_BODY_LIMIT = 16 * 1024 * 1024  # --max-body-bytes at most this (a delivery is a few KiB)


def check_serve_args(args: argparse.Namespace) -> None:
    """Every startup argument in range, before anything is loaded; a ConfigError names it."""
    if not _URL_PATH.fullmatch(args.path) or "/../" in f"{args.path}/" or len(args.path) > 200:
        raise ConfigError(
            f"--path {args.path[:80]!r}: expected an absolute URL path such as /webhook "
            "(letters, digits, '.', '_', '~', '-' between slashes)"
        )
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 1-65535")
    if not 1 <= args.max_body_bytes <= MAX_BODY_LIMIT:
        raise ConfigError(f"--max-body-bytes {args.max_body_bytes}: expected 1-{MAX_BODY_LIMIT}")
    for flag, value in (
        ("--header-timeout", args.header_timeout),
        ("--body-timeout", args.body_timeout),
    ):
        if not (math.isfinite(value) and 0 < value <= 300):
            raise ConfigError(f"{flag} {value}: expected seconds in (0, 300]")
    if not 1 <= args.max_pending <= 10000:
        raise ConfigError(f"--max-pending {args.max_pending}: expected 1-10000")
    if not args.host.strip():
        raise ConfigError("--host is empty; give a bind address such as 127.0.0.1")


def cmd_serve(args: argparse.Namespace) -> int:
    check_serve_args(args)
    import uvicorn
    from huggingface_hub import HfApi
    from prefect.settings import PREFECT_API_URL

    from flows.webhook import Receiver, SeenStore, create_app, server_config, watched_families
    from tasks.config import load_config
    from tasks.events import send_discovered
    from tasks.watch_tasks import use_hf_token

    cfg = load_config(args.config)
    watched = watched_families(cfg)
    if not watched:
        raise ConfigError(f"{args.config}: no family has watch.kind 'hub'; nothing to receive")
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: point it at the Prefect server whose realign "
            "deployment should react to the events"
        )
    use_hf_token(cfg.hf_token_secret)
    state = (args.state_dir or cfg.resolved_state_dir() / "webhook").expanduser().resolve()
    receiver = Receiver(
        config=cfg,
        config_ref=str(args.config),
        secret=resolve_secret(args.secret_env, args.secret_block),
        seen=SeenStore(state / "seen.sqlite"),
        # At one commit; the token comes from HF_TOKEN (never logged).
        model_info=lambda repo, sha: HfApi().model_info(repo, revision=sha, timeout=10.0),
        emit=send_discovered,
        max_body=args.max_body_bytes,
        body_timeout=args.body_timeout,
    )
    names = ", ".join(f"{family} ({base})" for family, (base, _) in watched.items())
    print(f"lssf webhook: POST http://{args.host}:{args.port}{args.path} for {names}")
    app = create_app(receiver, args.path)
    limits = {"header_timeout": args.header_timeout, "max_pending": args.max_pending}
    uvicorn.Server(server_config(app, args.host, args.port, **limits)).run()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("webhook", help=GROUP_HELP["webhook"])
    sub = p.add_subparsers(dest="webhook_command", metavar="ACTION", required=True)
    s = sub.add_parser(
        "serve",
        help="serve the receiver: Hub deliveries in, Prefect events out",
        description="Verify X-Webhook-Secret, keep commits on main of model repos that are "
        "fine-tunes or adapters of a family with watch.kind 'hub', emit "
        "lssf.finetune.discovered to PREFECT_API_URL once per repo@sha and family.",
    )
    s.add_argument("--config", type=Path, required=True, help="pipeline config YAML")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    s.add_argument("--port", type=int, default=8765, help="default %(default)s")
    s.add_argument("--path", default="/webhook", help="URL path of the endpoint (default /webhook)")
    s.add_argument(
        "--secret-env",
        default="LSSF_WEBHOOK_SECRET",
        help="environment variable holding the shared secret (default %(default)s)",
    )
    s.add_argument("--secret-block", help="Prefect Secret block holding it instead")
    s.add_argument(
        "--state-dir",
        type=Path,
        help="folder of the seen-delivery store (default: <config state_dir>/webhook)",
    )
    s.add_argument(
        "--max-body-bytes", type=int, default=64 * 1024, help="larger bodies get 413 (64 KiB)"
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a request head may take; then the connection is closed (default 10)",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        help="seconds an authenticated body may take; then 408 (default 10)",
    )
    s.add_argument(
        "--max-pending",
        type=int,
        default=64,
        help="connections that may be sending their head at once; more are closed (default 64)",
    )
    s.set_defaults(func=cmd_serve)
