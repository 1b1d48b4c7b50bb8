"""Deployable entrypoint: apply a directory of migrations to a saved node.

The flow lives in `chia_prefect.ops` (shared with `chia-prefect migrate`); this file is what
`prefect.yaml` points at. From a shell: `chia-prefect migrate --block sqlite-node/NAME --dir DIR`.
"""

from chia_prefect.ops import migrate_database

__all__ = ["migrate_database"]
