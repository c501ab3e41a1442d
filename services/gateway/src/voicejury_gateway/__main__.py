"""`python -m voicejury_gateway [serve] | migrate | create-key <tenant>` (serve by default)."""

from __future__ import annotations

import argparse
import asyncio

import uvicorn

from .app import create_app
from .db import JobRepository, create_pool
from .migrate import upgrade
from .settings import GatewaySettings


async def _create_key(settings: GatewaySettings, tenant: str) -> str:
    pool = await create_pool(settings.database_url, 1)
    try:
        return await JobRepository(pool).create_api_key(tenant)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="voicejury_gateway")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the REST API")
    sub.add_parser("migrate", help="apply the database schema (Alembic upgrade head)")
    key = sub.add_parser("create-key", help="create an API key for a tenant; printed once")
    key.add_argument("tenant")
    args = parser.parse_args()
    settings = GatewaySettings()
    if args.command == "migrate":
        upgrade(settings.database_url)
    elif args.command == "create-key":
        print(asyncio.run(_create_key(settings, args.tenant)))
    else:
        uvicorn.run(
            create_app(settings),
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            # Its lines through the root handler (JSON under VJ_LOG_JSON), not its own.
            log_config=None,
            timeout_graceful_shutdown=10,
        )


if __name__ == "__main__":
    main()
