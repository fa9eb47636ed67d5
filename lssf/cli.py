"""The ``lssf`` command line: parse, validate, call the typed API, report.

Core subcommands live here; other packages add theirs through ``lssf.commands`` (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING

from lssf._version import __version__
from lssf.commands import chosen_command, command_groups, group_help
from lssf.config import PatchConfig, load_model, load_yaml_model
from lssf.devices import DEVICE_CHOICES
from lssf.errors import LssfError

if TYPE_CHECKING:
    from lssf.patch import PatchManifest

log = logging.getLogger("lssf")
# PatchConfig fields that `lssf extract` also takes as flags (--max-rank for max_rank, ...),
# with their argument types; the help is the field's description.
CONFIG_FLAGS: dict[str, type] = {
    **{"eta": float, "max_rank": int, "weight_top": float, "rank_rule": str, "basis": str},
    **{"include": str, "exclude": str, "calibration": Path, "calibration_limit": int},
    **{"calibration_max_tokens": int, "activation_weight": str, "rank_spectrum": str},
    **{"calibration_answer_tokens": int, "activation_tokens": str},
}


def _patch_config(args: argparse.Namespace) -> PatchConfig:
    """YAML file first, then any flag given on the command line on top."""
    base = load_yaml_model(args.config, PatchConfig) if args.config else PatchConfig()
    flags = {f: v for f in CONFIG_FLAGS if (v := getattr(args, f)) is not None}
    return load_model(PatchConfig, base.model_dump() | flags, "command line")


def fail(command: str, message: str, code: int = 2) -> int:
    """THE error convention of every ``lssf`` command: ``lssf COMMAND: error: MESSAGE`` on stderr.

    Returns ``code``: 2 for bad input or usage (argparse's code too), 1 only for a bug.
    """
    from lssf.report import safe_text  # a message may quote a file: no terminal escapes

    lines = [safe_text(line, 2000, markup=False) for line in str(message).split("\n")[:60]]
    print(f"lssf {command}: error: " + "\n".join(lines), file=sys.stderr)
    return code


def cmd_extract(args: argparse.Namespace) -> int:
    """``lssf extract``: compute a patch and print its summary."""
    from rich.console import Console

    from lssf.extract import extract
    from lssf.report import render_table, summary

    patch = extract(
        args.aligned,
        args.reference,
        args.out,
        _patch_config(args),
        device=args.device,
        overwrite=args.overwrite,
    )
    s = summary(patch.manifest)
    print(
        f"patch {patch.patch_id} -> {patch.folder}: {s['tensors']} tensors, rank "
        f"{s['rank_min']}-{s['rank_max']} (mean {s['rank_mean']:.1f})"
    )
    if args.table:
        Console().print(render_table(patch.manifest))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    """``lssf fuse``: fuse a patch into a fine-tune (a folder, a Hub id or a LoRA adapter)."""
    from lssf.fuse import fuse

    result = fuse(
        args.finetuned,
        args.patch,
        args.out,
        alpha=args.alpha,
        force=args.force,
        device=args.device,
        overwrite=args.overwrite,
        aligned=args.aligned,
        output_format=args.format,
    )
    print(
        f"fused {result.n_fused} tensors of {result.finetuned.name}@{result.finetuned.revision} "
        f"with patch {result.patch_id} (alpha={result.alpha}) -> {args.format} {result.out}"
    )
    return 0


def cmd_patch_export_adapter(args: argparse.Namespace) -> int:
    """``lssf patch export-adapter``: the patch alone as a PEFT LoRA adapter."""
    import torch

    from lssf.adapter_out import export_patch_adapter

    out = export_patch_adapter(
        args.patch_dir,
        args.out,
        alpha=args.alpha,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
    )
    print(f"safety patch {args.patch_dir} (alpha={args.alpha}) -> PEFT LoRA adapter {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``lssf inspect``: a patch's per-layer table, JSON manifest or plot."""
    from rich.console import Console

    from lssf.patch import SafetyPatch
    from lssf.report import render_table, safe_text, summary

    m = SafetyPatch.load(args.patch_dir).manifest
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    console, s = Console(), summary(m)
    console.print(render_table(m))
    sources = f"aligned {m.aligned.name}@{m.aligned.revision} | reference "
    console.print(
        safe_text(sources + f"{m.reference.name}@{m.reference.revision}", 600)
        + f" | rank mean {s['rank_mean']:.1f}, "
        f"factors hold {100 * s['factor_params_fraction']:.2f}% of the targeted parameters"
    )
    if args.plot:
        print(f"plot written to {write_plot(m, args.plot, overwrite=args.overwrite)}")
    return 0


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_plot(manifest: PatchManifest, path: Path, *, overwrite: bool = False) -> Path:
    """The rank plot at exactly ``path``: a ``.png`` in an existing folder, built aside.

    ``overwrite`` replaces only a PNG file, never a link, a folder or other data.
    """
    from lssf.errors import OutputError
    from lssf.outputs import atomic_file, output_path
    from lssf.report import plot_ranks

    if Path(path).suffix.lower() != ".png":
        raise OutputError(f"--plot {path}: the plot is a PNG image; name a file ending in .png")
    real = output_path(path)
    if overwrite and real.is_file() and not real.is_symlink():
        with open(real, "rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise OutputError(f"--plot {path} exists and is not a PNG image; left it")
    with atomic_file(real, overwrite=overwrite) as tmp:
        plot_ranks(manifest, tmp)
    return Path(path)


def cmd_quickstart(args: argparse.Namespace) -> int:
    """``lssf quickstart``: the whole path on tiny checkpoints."""
    from rich.console import Console

    from lssf.quickstart import run_quickstart

    run_quickstart(args.workdir, console=Console())
    return 0


def _add_core(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="compute a safety patch from an aligned/reference pair")
    p.add_argument("--aligned", required=True, help="aligned model: folder or org/name[@rev]")
    p.add_argument("--reference", required=True, help="unaligned base or harmful fine-tune")
    p.add_argument("--out", required=True, type=Path, help="patch folder to create")
    p.add_argument("--config", type=Path, help="PatchConfig YAML; flags override its fields")
    for field, kind in CONFIG_FLAGS.items():
        info = PatchConfig.model_fields[field]
        many = field in ("include", "exclude")
        help_ = f"{info.description} ({'repeatable' if many else f'default {info.default}'})"
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, help=help_,
                       action="append" if many else "store")  # fmt: skip
    p.add_argument("--table", action="store_true", help="print the per-layer table after")
    _add_common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("fuse", help="add a safety patch to a fine-tuned model")
    p.add_argument(
        "--finetuned",
        required=True,
        help="fine-tuned model or PEFT LoRA adapter: folder or org/name[@rev]",
    )
    p.add_argument("--patch", required=True, type=Path, help="patch folder from `lssf extract`")
    p.add_argument("--out", required=True, type=Path, help="model folder to create")
    p.add_argument("--alpha", type=float, default=1.0, help="fusion strength (default 1.0)")
    p.add_argument("--force", action="store_true", help="fuse even if the declared base differs")
    p.add_argument(
        "--aligned", help="base of a LoRA --finetuned (default: its adapter_config's base model)"
    )
    p.add_argument(
        "--format",
        choices=("model", "adapter"),
        default="model",
        help="model: merged model folder (default); adapter: one PEFT LoRA adapter holding the "
        "LoRA fine-tune and the patch (LoRA fine-tunes only)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("patch", help="operations on a safety patch folder")
    patch_sub = p.add_subparsers(dest="patch_command", metavar="ACTION", required=True)
    q = patch_sub.add_parser(
        "export-adapter", help="write the safety patch alone as a PEFT LoRA adapter"
    )
    q.add_argument("patch_dir", type=Path, help="patch folder from `lssf extract`")
    q.add_argument("--alpha", type=float, default=1.0, help="fusion strength (default 1.0)")
    q.add_argument("--out", required=True, type=Path, help="adapter folder to create")
    q.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="dtype of the adapter weights (default float32)",
    )  # fmt: skip
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_patch_export_adapter)

    p = sub.add_parser("inspect", help="per-layer table (and plot) of a safety patch")
    p.add_argument("patch_dir", type=Path)
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png",
        help="write the rank-by-layer plot (a new .png in an existing folder)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot PNG")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "quickstart", help="build tiny checkpoints, extract, fuse and print the table"
    )
    p.add_argument("--workdir", type=Path, default=Path(".state/quickstart"))
    p.set_defaults(func=cmd_quickstart)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="default: auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; of the entry-point groups only ``load`` is imported and registered.

    Every other group gets a placeholder that ``--help`` lists and that accepts any arguments.
    """
    parser = argparse.ArgumentParser(
        prog="lssf",
        description="Re-align fine-tuned LLMs with Low-Rank Safety Subspace Fusion "
        "(Zhou et al., ACL 2025), gate them and register them.",
    )
    parser.add_argument("--version", action="version", version=f"lssf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the Python traceback too"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_core(sub)
    for name, ep in command_groups().items():
        if name in sub.choices:  # a core command of that name wins
            continue
        error = _register_group(sub, ep) if name == load else "not loaded"
        if error is not None and name not in sub.choices:
            _add_placeholder(sub, name, error)
    return parser


def _register_group(sub: argparse._SubParsersAction, ep: EntryPoint) -> str | None:
    """Import and run one group's ``register``; the import error's text if it cannot load."""
    try:
        register = ep.load()
    except ImportError as exc:  # a broken extra must not take the core commands down
        log.warning("command %r is unavailable: %s", ep.name, exc)
        return f"{type(exc).__name__}: {exc}"
    register(sub)
    return None


def _add_placeholder(sub: argparse._SubParsersAction, name: str, error: str) -> None:
    """A stand-in for a group that is not loaded: listed by ``--help``, reports ``error``."""
    p = sub.add_parser(name, help=group_help(name), add_help=False)
    message = f"command is unavailable ({error})"
    p.set_defaults(func=lambda args: fail(name, message), placeholder=True)


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every ``finally`` (temp folders) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Stopped`` once (more of them are ignored while it unwinds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    signums = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    kept = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    """Run ``lssf`` with ``argv`` (default: the process's); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(load=chosen_command(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "placeholder", False):
        args = parser.parse_args(argv)  # the usual "unrecognized arguments" error
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _signals_stop():
            return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        return fail(args.command, "interrupted (Ctrl-C)", 130)
    except Stopped as exc:
        if args.debug:
            raise
        name = signal.Signals(exc.signum).name
        return fail(args.command, f"stopped by {name}", 128 + exc.signum)
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, (LssfError, OSError)):  # bad input or an unusable path: exit 2
            return fail(args.command, str(exc))
        # A bug in lssf: still one line; --debug shows where.
        return fail(
            args.command,
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback, and please report it)",
            code=1,
        )


def run() -> None:
    """The ``lssf`` console script: :func:`main`, then exit without a last collection."""
    try:
        code = main()
    except KeyboardInterrupt:  # while starting up, before a command ran
        print("lssf: interrupted", file=sys.stderr)
        code = 130
    # The interpreter's last collection would walk every object torch and the libraries made
    # (~0.5 s of a 2.5 s start measured here); frozen objects are skipped. Not in ``main``,
    # which tests and callers run in their own process.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
