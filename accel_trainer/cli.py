"""``accel-trainer``: the command-line side of the package.

Subcommands:
    env                 versions and devices, for bug reports
    params CONFIG       total/active parameter counts of a model config.json (built on the meta device)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_env(args) -> int:
    import accelerate
    import torch
    import transformers

    from . import __version__

    print(f"accel_trainer {__version__}\ntorch {torch.__version__}\naccelerate {accelerate.__version__}\n"
          f"transformers {transformers.__version__}\npython {sys.version.split()[0]}\n"
          f"cuda available: {torch.cuda.is_available()} ({torch.cuda.device_count()} device(s))")
    return 0


def cmd_params(args) -> int:
    import torch

    from .models import MoEConfig, MoEForCausalLM, count_parameters

    path = Path(args.config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"accel-trainer params: no config.json at {args.config}")
    try:
        config = MoEConfig(**{k: v for k, v in json.loads(path.read_text()).items() if k != "model_type"})
    except (ValueError, TypeError) as err:
        raise SystemExit(f"accel-trainer params: {path}: not a valid model config ({err})")
    with torch.device("meta"):
        counts = count_parameters(MoEForCausalLM(config), config)
    print(json.dumps(counts) if args.json else
          f"total {counts['total']:,}  active {counts['active']:,}  routed experts {counts['experts']:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions and devices").set_defaults(func=cmd_env)
    p = sub.add_parser("params", help="count parameters of a model config.json")
    p.add_argument("config", help="config.json or a folder holding one")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
