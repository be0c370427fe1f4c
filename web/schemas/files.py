"""POST /v1/files (a multipart form) and GET /v1/files."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class CreateFileRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Ferry stores files for the Batch API only.
    purpose: Literal["batch"]


class ListFilesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    purpose: str | None = None
    limit: Annotated[int, Field(ge=1, le=10000)] = 10000
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
