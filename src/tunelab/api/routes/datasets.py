"""`POST /v1/datasets`: multipart upload, size-limited, stored under a generated name, validated."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from tunelab import services
from tunelab.api.deps import SettingsDep
from tunelab.api.responses import errors
from tunelab.api.schemas import DatasetPublic

router = APIRouter(prefix="/datasets", tags=["datasets"])

_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=_FORM_SCHEMA,
    responses=errors(415, 507),
)
async def upload_dataset(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """Upload a .jsonl/.json/.csv/.parquet file in the form field ``file``; use the returned ``path`` as data.train."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with a 'file' field")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the form has no file in a field named 'file'")
        stored = await run_in_threadpool(
            services.upload_dataset,
            upload.file,
            filename=upload.filename or "",
            limit_bytes=settings.upload_limit_bytes,
        )
        return stored.to_dict()
    finally:
        await form.close()  # deletes the spooled temp file
