"""Images that carry their own generation settings (a JSON spec in a PNG text chunk)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import CLoRAError

SPEC_CHUNK = "clora"
RUNTIME_CHUNK = "clora-runtime"


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    spec: dict[str, Any],
    runtime: dict[str, Any] | None = None,
    temp_dir: str | os.PathLike | None = None,
) -> None:
    """Write ``image`` with the spec as JSON in a ``clora`` text chunk; atomic (temp file + rename)."""
    info = PngInfo()
    info.add_text(SPEC_CHUNK, json.dumps(spec, sort_keys=True))
    if runtime:
        info.add_text(RUNTIME_CHUNK, json.dumps(runtime, sort_keys=True))
    save_atomic(image, path, temp_dir=temp_dir, pnginfo=info)


def save_atomic(
    image: Image.Image, path: str | os.PathLike, temp_dir: str | os.PathLike | None = None, **save_args: Any
) -> None:
    """Save a PNG so that ``path`` either holds the whole file or is untouched.

    The image is written to a temporary file (in ``temp_dir``, on the same file system, else next to
    ``path``) and renamed into place. The file gets the permissions a plain write would give: an
    existing file keeps its mode, a new one gets ``0666 & ~umask`` (not the 0600 of the temporary file).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=temp_dir or path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", **save_args)
        os.chmod(tmp, _plain_write_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain_write_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:  # a new file
        umask = os.umask(0o022)  # the only portable way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


def read_png_runtime(path: str | os.PathLike) -> dict[str, Any]:
    """Where a PNG made by ``clora generate`` was made (``device``, ``dtype``, ``clora`` version);
    empty when the PNG carries no readable ``clora-runtime`` chunk (the spec is what matters)."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(RUNTIME_CHUNK)
        data = json.loads(text) if text else {}
    except (OSError, SyntaxError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_png_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The spec stored by ``save_png``."""
    path = Path(path)
    if not path.is_file():
        raise CLoRAError(f"{path}: PNG not found")
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(SPEC_CHUNK)
    except (OSError, SyntaxError) as exc:
        raise CLoRAError(f"{path}: not a readable PNG ({exc})") from None
    if text is None:
        raise CLoRAError(f"{path}: has no '{SPEC_CHUNK}' text chunk (was it made by clora generate?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLoRAError(f"{path}: the '{SPEC_CHUNK}' chunk is not valid JSON ({exc})") from None
