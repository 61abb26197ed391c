"""Bundle: the output directory (manifest.json + <method>.pt2 + <method>.onnx), written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import GraphoptError

FORMAT = "graphopt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def build_manifest(program, reports: list[dict], files: dict[str, dict[str, str]], extra: dict) -> dict:
    from .. import __version__
    methods = {}
    for name in program.methods:
        methods[name] = {
            "inputs": [s.to_json() for s in program.inputs[name]],
            "outputs": [s.to_json() for s in program.output_specs(name)],
            "files": files.get(name, {}),
        }
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "graphopt_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "source": program.source, "plan": program.plan, "dims": program.dims,
        "methods": methods, "passes": [_jsonable(r) for r in reports], **extra,
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "traceback"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.exists():
        raise GraphoptError(f"bundle '{directory}' not found: give the directory that `optimize -o` wrote")
    path = directory / MANIFEST
    if not path.is_file():
        raise GraphoptError(f"'{directory}' is not a graphopt bundle (no {MANIFEST}); re-run optimize -o {directory}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GraphoptError(f"'{path}' is corrupt ({e}); re-run optimize to rebuild the bundle")
    if manifest.get("format") != FORMAT:
        raise GraphoptError(f"'{path}' is not a graphopt manifest; re-run optimize to rebuild the bundle")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise GraphoptError(f"'{directory}' was written by a newer graphopt (format "
                            f"{manifest['format_version']}); upgrade graphopt to load it")
    return manifest


def check_destination(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise GraphoptError(f"output '{out}' already exists: pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise GraphoptError(f"output '{out}' exists and is not a directory; remove it or choose another -o")


def publish(staging: Path, out: Path, force: bool) -> Path:
    """Copy a finished staging directory to `out` atomically: readers see the old bundle or the new, never half."""
    out = Path(out).absolute()
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary directory
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
