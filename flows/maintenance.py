"""Deployable entrypoint: nightly maintenance of a saved node, each step a task in the UI.

The flow lives in `chia_prefect.ops` (shared with `chia-prefect maintain`); this file is what
`prefect.yaml` points at. From a shell: `chia-prefect maintain --block sqlite-node/NAME`.
"""

from chia_prefect.ops import maintenance

__all__ = ["maintenance"]
