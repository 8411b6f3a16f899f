"""The ``diloco`` command line: ``diloco train [--config FILE] [--set section.key=value ...]``.

User errors (:class:`diloco.errors.DilocoError`) print one line, ``diloco: error: …``, and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diloco.errors import DilocoError

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the tiny CPU SNOO job)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set outer.sync_every=32",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from diloco.config import load_config
    from diloco.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    print(
        f"final val loss {summary['final_val_loss']:.4f} after {summary['steps']} steps "
        f"({summary['tokens']} tokens, {summary['wall_s']:.1f} s); outputs in {cfg.run.out_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diloco", description="Low-communication two-loop training (DiLoCo, SNOO, EMA-Nesterov)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a GPT with the configured inner/outer optimisers")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DilocoError as e:
        print(f"diloco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diloco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
