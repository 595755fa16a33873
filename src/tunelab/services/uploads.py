"""What only the API needs: dataset uploads and the models chat completions can serve."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tunelab.services.runs import list_runs
from tunelab.settings import get_settings
from tunelab.vocab import UPLOAD_SUFFIXES


def upload_dataset(source: Any, *, filename: str, limit_bytes: int) -> dict[str, Any]:
    """Store an uploaded data file under ``$TUNELAB_HOME/datasets`` and validate it like `data validate`.

    The client's file name only picks the format (its suffix); the stored name
    is generated, so no path from the client is ever used as a path.  A file
    over ``limit_bytes`` or with invalid records is deleted again.
    """
    import uuid

    from tunelab.data.validate import validate_dataset
    from tunelab.errors import DataError, TooLargeError

    suffix = next((s for s in UPLOAD_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(f"upload a {', '.join(UPLOAD_SUFFIXES)} file (got {filename[:80]!r})")
    folder = get_settings().datasets_dir
    folder.mkdir(parents=True, exist_ok=True)
    dataset_id = uuid.uuid4().hex[:12]
    dest = folder / f"{dataset_id}{suffix}"
    try:
        with dest.open("xb") as out:
            written = 0
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limit_bytes:
                    raise TooLargeError(f"the file is larger than the upload limit of {limit_bytes} bytes")
                out.write(chunk)
        if written == 0:
            raise DataError("the uploaded file is empty")
        report = validate_dataset(str(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return {
        "id": dataset_id,
        "path": str(dest),
        "format": report["format"],
        "size_bytes": written,
        "splits": report["splits"],
    }


def served_models() -> list[dict[str, Any]]:
    """Finished runs that chat completions can serve, as ``run:RUN_ID`` models."""
    out = []
    for run in list_runs(status="completed", limit=1000):
        if run["artifacts"].get("adapter") or run["artifacts"].get("model"):
            created = datetime.fromisoformat(run["finished_at"] or run["created_at"])
            out.append(
                {
                    "id": f"run:{run['id']}",
                    "created": int(created.timestamp()),
                    "base_model": run["config"]["model"]["path"],
                }
            )
    return out
