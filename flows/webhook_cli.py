"""`lssf webhook serve`: run the Hub webhook receiver (flows.webhook) under uvicorn.

Registered through the `lssf.commands` entry point `webhook`. FastAPI, uvicorn and Prefect
are imported inside the handler, so `lssf --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_SECRET_ENV = "LSSF_WEBHOOK_SECRET"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
HELP = "receive Hugging Face Hub webhooks and emit lssf.finetune.discovered"


def hub_model_info(repo: str, revision: str):
    """`HfApi().model_info` at one commit; the token comes from HF_TOKEN (never logged)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(repo, revision=revision, timeout=10.0)


def _secret_block(name: str) -> str:
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


def resolve_secret(env_var: str, block: str | None) -> str:
    """The shared secret: from a Prefect Secret block when named, else from `env_var`."""
    from lssf.errors import ConfigError

    if block is not None:
        secret, origin = _secret_block(block), f"Prefect Secret block {block!r}"
    else:
        secret, origin = os.environ.get(env_var, ""), f"environment variable {env_var}"
    if not secret:
        raise ConfigError(f"no webhook secret: {origin} is empty or unset")
    if not secret.isascii():
        raise ConfigError(f"webhook secret from {origin} is not ASCII (the Hub sends ASCII only)")
    return secret


def _require_prefect_api() -> None:
    from prefect.settings import PREFECT_API_URL

    from lssf.errors import ConfigError

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: point it at the Prefect server whose realign "
            "deployment should react to the events"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flows.webhook import Receiver, SeenStore, create_app, watched_families
    from lssf.errors import ConfigError
    from tasks.config import load_config
    from tasks.events import send_discovered

    cfg = load_config(args.config)
    watched = watched_families(cfg)
    if not watched:
        raise ConfigError(f"{args.config}: no family has watch.kind 'hub'; nothing to receive")
    _require_prefect_api()
    if cfg.hf_token_secret:
        os.environ["HF_TOKEN"] = _secret_block(cfg.hf_token_secret)
    state = (args.state_dir or cfg.resolved_state_dir() / "webhook").expanduser().resolve()
    receiver = Receiver(
        config=cfg,
        config_ref=str(args.config),
        secret=resolve_secret(args.secret_env, args.secret_block),
        seen=SeenStore(state / "seen.sqlite"),
        model_info=hub_model_info,
        emit=send_discovered,
        max_body=args.max_body_bytes,
    )
    names = ", ".join(f"{w.family} ({w.base_model})" for w in watched)
    print(f"lssf webhook: POST http://{args.host}:{args.port}{args.path} for {names}")
    uvicorn.run(create_app(receiver, args.path), host=args.host, port=args.port, log_level="info")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("webhook", help=HELP)
    sub = p.add_subparsers(dest="webhook_command", metavar="ACTION", required=True)
    s = sub.add_parser(
        "serve",
        help="serve the receiver: Hub deliveries in, Prefect events out",
        description="Verify X-Webhook-Secret, keep commits on main of model repos that are "
        "fine-tunes or adapters of a family with watch.kind 'hub', emit "
        "lssf.finetune.discovered to PREFECT_API_URL once per repo@sha and family.",
    )
    s.add_argument("--config", type=Path, required=True, help="pipeline config YAML")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    s.add_argument("--path", default="/webhook", help="URL path of the endpoint (default /webhook)")
    s.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        help=f"environment variable holding the shared secret (default {DEFAULT_SECRET_ENV})",
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
    s.set_defaults(func=cmd_serve)
