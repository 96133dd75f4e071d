"""Each vocabulary is defined once: what the HTTP API documents is what the engine accepts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.db.models import JOB_STATES
from d4c_core.recipe import CALIB_METHODS, D4C_COMPONENTS
from d4c_core.vocabulary import ARTIFACT_MEDIA_TYPES

pytestmark = pytest.mark.anyio


async def _schema(client: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await client.get("/openapi.json")).json())


async def test_openapi_enums_are_the_engine_vocabularies(client: httpx.AsyncClient) -> None:
    doc = await _schema(client)
    comps = doc["components"]["schemas"]
    assert comps["CalibrationRecipe"]["properties"]["method"]["enum"] == list(CALIB_METHODS)
    items = comps["SynthRecipe"]["properties"]["components"]["items"]
    assert items["enum"] == list(D4C_COMPONENTS)
    assert comps["JobOut"]["properties"]["state"]["enum"] == list(JOB_STATES)
    params = doc["paths"]["/jobs"]["get"]["parameters"]
    state = next(p for p in params if p["name"] == "state")
    assert state["schema"]["anyOf"][0]["enum"] == list(JOB_STATES)
    # The job body's recipe is the engine's Recipe, field for field.
    from d4c_core.recipe import Recipe

    body = comps["JobCreate"]["properties"]["recipe"]
    assert body.get("$ref", "").endswith("/Recipe") or "Recipe" in str(body)
    assert set(comps["Recipe"]["properties"]) == set(Recipe.model_fields)


async def test_downloads_document_every_artifact_media_type(client: httpx.AsyncClient) -> None:
    doc = await _schema(client)
    ok = doc["paths"]["/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]
    assert set(ok["content"]) == set(ARTIFACT_MEDIA_TYPES.values())
