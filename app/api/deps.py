"""Request-scoped dependencies: settings, a DB session, and the authenticated tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from app import crud
from app.api.problems import Problem
from app.core.config import Settings
from app.core.security import KeyCache, hash_key


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        yield session


def read_connection(request: Request) -> AbstractAsyncContextManager[AsyncConnection]:
    """An autocommit connection for a request that runs one SELECT (no BEGIN/ROLLBACK).

    Used inside the handler (``async with read_connection(request) as conn``) rather than as
    a dependency: a generator dependency costs an exit stack and a cancel scope per request,
    which on ``GET /jobs/{id}`` is a measurable share of the whole request.
    """
    engine: AsyncEngine = request.app.state.read_engine
    return engine.connect()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="API key from `d4c keys create`")


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def get_tenant_id(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant owning the Bearer key; 401 for a missing, unknown or revoked key.

    Lookups are cached in-process for ``api_key_cache_ttl_s``, so on the hot path the only
    query a request makes is its own. The dependency takes no session: on a cache hit it
    touches no database object at all, and a miss uses its own autocommit connection.
    """
    if creds is None or not creds.credentials:
        raise _unauthorized("missing Bearer API key")
    key_hash = hash_key(creds.credentials)
    cache: KeyCache = request.app.state.key_cache
    hit, tenant_id = cache.get(key_hash)
    if not hit:
        async with read_connection(request) as conn:
            tenant_id = await crud.tenant_of_key(conn, key_hash)
        cache.put(key_hash, tenant_id)
    if tenant_id is None:
        raise _unauthorized("invalid API key")
    return tenant_id


TenantDep = Annotated[str, Depends(get_tenant_id)]
