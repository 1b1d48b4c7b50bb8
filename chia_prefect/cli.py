"""`chia-prefect mcp --block sqlite-node/my-db`: serve a saved node's query tool over stdio.

For desktop MCP clients, which start the server as a subprocess. The block is loaded from
the Prefect API named by PREFECT_API_URL. Logs go to stderr; stdout carries the protocol.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chia-prefect")
    commands = parser.add_subparsers(dest="command", required=True)
    mcp = commands.add_parser("mcp", help="serve a saved node's SQL tool over MCP stdio")
    mcp.add_argument("--block", required=True, help='saved node as "slug/name", e.g. sqlite-node/my-db')
    mcp.add_argument("--name", help="tool server name (default: the block name)")
    mcp.add_argument("--read-write", action="store_true", help="also expose execute(sql)")
    mcp.add_argument("--row-limit", type=int, default=100)
    mcp.add_argument("--cell-char-limit", type=int, default=4096)
    mcp.add_argument("--total-char-limit", type=int, default=32768)
    mcp.add_argument("--time-limit-s", type=float, default=10.0)
    mcp.add_argument("--allow-privileged-role", action="store_true",
                     help="DANGEROUS: serve a Postgres superuser or server file/program role anyway")
    args = parser.parse_args(argv)

    from prefect.blocks.core import Block

    from chia_prefect.query_tool import (
        Caps,
        PostgresToolSession,
        SQLiteToolSession,
        build_server,
    )

    node = Block.load(args.block)
    caps = Caps(args.row_limit, args.cell_char_limit, args.total_char_limit, args.time_limit_s)
    if node.engine == "sqlite":
        session = SQLiteToolSession(node.db_path, caps)
    else:
        session = PostgresToolSession(node, caps)
        session.check_role(args.allow_privileged_role)
    server = build_server(session, args.name or args.block.split("/")[-1], args.read_write)
    server.run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
