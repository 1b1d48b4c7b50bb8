"""Deployable entrypoint: the atomic transaction demo.

The flow lives in `chia_prefect.ops` (shared with `chia-prefect demo`); this file is what
`prefect.yaml` points at. `python flows/atomic_demo.py [options]` is `chia-prefect demo [options]`.
"""

import sys

from chia_prefect.ops import atomic_demo, format_summary, iteration_ops

__all__ = ["atomic_demo", "format_summary", "iteration_ops"]

if __name__ == "__main__":
    from chia_prefect.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
