"""The `fbft` command line: `fbft synth ROOT` generates the synthetic tiny-defect benchmark;
`fbft predict --model MODEL --out DIR IMAGES...` scores images with a saved detector."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fbft import predict
from fbft.data import synthetic


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fbft` command."""
    parser = argparse.ArgumentParser(prog="fbft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic.add_synth_command(commands)
    predict.add_predict_command(commands)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
