"""Identity of input files (size + SHA-256 of the content), to tell whether a run's inputs changed.

A resumed reconstruction must continue from the data it started on: the CLI records the identity of every
input next to its checkpoints and compares it on ``--resume`` (:func:`compare_identities`). Paths are kept for
the message only; a moved or renamed file with the same bytes is the same input.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["file_identity", "inputs_identity", "compare_identities", "IDENTITY_FORMAT", "read_identity"]

IDENTITY_FORMAT = "sirf_ddip-inputs/1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "size", "sha256"}`` of one file."""
    p = Path(path)
    return {"path": str(p), "size": p.stat().st_size, "sha256": _sha256(p)}


def inputs_identity(files: Mapping[str, Sequence[str | os.PathLike] | None],
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The identity record of a run's inputs.

    Parameters
    ----------
    files : mapping
        Role (``"prompts"``, ``"mr"``) -> the files that hold it (an Interfile header and its data file), or
        ``None`` for a role the run does not use.
    extra : mapping, optional
        Other identities already known (e.g. ``{"prior": {"sha256": ...}}``).
    """
    rec: dict[str, Any] = {}
    for role, paths in files.items():
        rec[role] = None if not paths else [file_identity(p) for p in paths]
    for k, v in (extra or {}).items():
        rec[k] = v
    return {"format": IDENTITY_FORMAT, "inputs": rec}


def read_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The identity record at ``path``, or ``None`` when absent or not one of ours."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == IDENTITY_FORMAT else None


def _content(v: Any) -> Any:
    """What identifies an input: sizes and hashes, not paths."""
    if isinstance(v, list):
        return [(e.get("size"), e.get("sha256")) if isinstance(e, dict) else e for e in v]
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if k != "path"}
    return v


def _describe(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, list):
        return ", ".join(f"{e.get('path')} ({e.get('size')} bytes, sha256 {str(e.get('sha256'))[:12]}…)" for e in v)
    if isinstance(v, dict):
        return f"{v.get('path', '')} (sha256 {str(v.get('sha256'))[:12]}…)".strip()
    return str(v)


def compare_identities(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One sentence per input whose content differs between two :func:`inputs_identity` records (empty: same)."""
    a, b = saved.get("inputs", {}), now.get("inputs", {})
    out = []
    for role in sorted(set(a) | set(b)):
        if _content(a.get(role)) != _content(b.get(role)):
            out.append(f"{role} changed (checkpoint: {_describe(a.get(role))}; now: {_describe(b.get(role))})")
    return out
