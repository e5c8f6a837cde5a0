"""Models that plora builds once and caches: the tiny test model and models converted from GGUF.

A build is keyed: its directory holds a marker file with the key it was built from, and a directory
whose marker has the same key is reused as it is. A build is written to a temporary sibling, synced and
renamed into place, so an interrupted build never looks complete; builders of one directory take turns
(a lock), so a concurrent identical build is simply reused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from parallel import atomic, outdir

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_root() -> Path:
    return Path(os.environ["PLORA_CACHE"]) if os.environ.get("PLORA_CACHE") else REPO_ROOT / ".cache"


def read_marker(directory: Path, marker_name: str) -> dict[str, Any]:
    """The build record of a cached directory, or {} where there is none."""
    try:
        return json.loads((Path(directory) / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def build_cached(
    out_dir: Path,
    marker: dict[str, Any],
    marker_name: str,
    write: Callable[[Path], None],
    *,
    what: str,
    overwrite: bool = False,
    inputs: Iterable[outdir.Protected] = (),
) -> Path:
    """Run ``write(tmp_dir)`` and publish it with ``marker`` at ``out_dir``, unless ``out_dir`` already
    holds a build with ``marker["key"]``. Otherwise ``out_dir`` must be absent or empty, or anything
    with ``overwrite`` (replaced once the new build is whole) but the build's ``inputs``. ``what``
    names the build in errors."""
    out_dir = Path(out_dir)
    if read_marker(out_dir, marker_name).get("key") == marker["key"]:
        return out_dir
    outdir.refuse_protected(out_dir, "--out", inputs)
    with outdir.lock(out_dir, "--out", wait=True):
        if read_marker(out_dir, marker_name).get("key") == marker["key"]:  # built by the one we waited for
            return out_dir
        outdir.refuse_foreign(out_dir, "--out", overwrite, is_own=lambda _: False)
        target = outdir.real_target(out_dir)
        tmp_dir = atomic.make_temp_dir(target)
        try:
            write(tmp_dir)
            atomic.write_json(tmp_dir / marker_name, marker)
            # Without --overwrite, what appeared in --out during the build is kept.
            atomic.publish_dir(tmp_dir, target, replace=overwrite)
        except (OSError, SafetensorError) as err:
            raise outdir.write_failure(out_dir, what, err) from None
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
