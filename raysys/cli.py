"""``raysys`` command line: one command, one verb per pipeline stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raysys.config import ConfigError, load_config
from raysys.contract import ContractError
from raysys.data.readers import DataError

log = logging.getLogger("raysys")


def _cmd_train(args: argparse.Namespace) -> int:
    from raysys.train.launch import run_training

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.out or "runs/train")
    outcome = run_training(cfg, out)
    last = outcome.history[-1] if outcome.history else {}
    print(
        json.dumps(
            {
                "steps": f"{outcome.stopped_at}/{outcome.total_steps}",
                "first_loss": outcome.history[0]["loss"] if outcome.history else None,
                "last_loss": last.get("loss"),
                "tokens_per_s": last.get("tokens_per_s"),
                "skipped": outcome.skipped["skipped"],
                "model": str(outcome.model_dir) if outcome.model_dir else None,
                "checkpoint": outcome.checkpoint_path,
            },
            indent=2,
        )
    )
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from raysys.data.demo import build_demo_beir

    print(build_demo_beir(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysys", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a retriever on Ray Train + DeepSpeed")
    t.add_argument("config", help="YAML config (see jobs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.zero_stage=3")
    t.add_argument("--out", help="output directory (default: config `out`, else runs/train)")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo-data", help="write the stdlib-docstring demo dataset as a BEIR folder")
    d.add_argument("out")
    d.set_defaults(func=_cmd_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ContractError, DataError) as e:
        print(f"raysys: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
