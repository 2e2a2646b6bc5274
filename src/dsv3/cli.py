"""The `dsv3` command line. Each subcommand imports what it needs, so `dsv3 --help` stays fast."""

from __future__ import annotations

import argparse
import sys


def _params(args: argparse.Namespace) -> int:
    from .config import get_config
    from .params import count_parameters, print_report

    print_report(count_parameters(get_config(args.config)), args.config)
    return 0


def _not_yet(what: str):
    def run(args: argparse.Namespace) -> int:
        print(f"dsv3 {what}: not yet — this part of dsv3 is still being built (see the open issues).")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="parameter counts and KV-cache bytes of a config")
    p.add_argument("config", help="a preset (tiny, small, deepseek-v3-671b), a config.json or a checkpoint dir")
    p.set_defaults(func=_params)

    p = sub.add_parser("demo", help="the main job: prepare data, train the small preset, evaluate, sample")
    p.set_defaults(func=_not_yet("demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
