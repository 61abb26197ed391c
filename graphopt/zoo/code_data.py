"""The zoo LM's corpus: the running interpreter's standard-library .py files, split by path."""
from __future__ import annotations

import hashlib
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from .tokenizer import BOS_ID

HELDOUT_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(relpath: str) -> bool:
    # Hash of the path, not of the content, so the split is stable across machines with the same stdlib layout.
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


@lru_cache(maxsize=None)
def split_files() -> dict[str, tuple[str, ...]]:
    """{'train': relpaths, 'heldout': relpaths}, sorted, deterministic."""
    root = stdlib_root()
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )
    if not files:
        raise RuntimeError(f"no .py files under the stdlib at {root}")
    return {
        "train": tuple(f for f in files if not _is_heldout(f)),
        "heldout": tuple(f for f in files if _is_heldout(f)),
    }


@lru_cache(maxsize=2)
def token_stream(split: str) -> torch.Tensor:
    """All files of a split as one int64 stream, each file prefixed by BOS."""
    root = stdlib_root()
    parts = []
    for rel in split_files()[split]:
        data = (root / rel).read_bytes()
        parts.append(torch.tensor([BOS_ID], dtype=torch.int64))
        if data:
            parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64))
    return torch.cat(parts)


def random_windows(split: str, n: int, length: int, seed: int) -> torch.Tensor:
    stream = token_stream(split)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length - 1, (n,), generator=g)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def heldout_windows(length: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens over the held-out stream (the tail that does not fill one is dropped)."""
    stream = token_stream("heldout")
    n = len(stream) // length
    if max_windows is not None and max_windows < n:
        # An evenly spaced subset: a fast estimate that still covers every part of the split.
        idx = torch.linspace(0, n - 1, max_windows).round().long().tolist()
    else:
        idx = range(n)
    return torch.stack([stream[i * length:(i + 1) * length] for i in idx])


def calibration_set(n: int = 32, length: int = 128, seed: int = 1234) -> list[tuple[torch.Tensor]]:
    """Calibration inputs from the training split: a list of (input_ids[1, length],) tuples."""
    return [(w.unsqueeze(0),) for w in random_windows("train", n, length, seed)]


def heldout_prompts(n: int = 64, max_context: int = 96, seed: int = 0) -> list[str]:
    """Code prompts from held-out files: some context, then a `def name(` line cut after the parenthesis."""
    return split_prompts("heldout", n, max_context, seed)


def split_prompts(split: str, n: int, max_context: int = 96, seed: int = 0) -> list[str]:
    """Prompts shaped like heldout_prompts from one split's files (train: draft-head training data)."""
    root = stdlib_root()
    candidates = []
    for rel in split_files()[split]:
        text = (root / rel).read_text("utf-8", errors="replace")
        pos = 0
        while True:
            i = text.find("def ", pos)
            if i < 0:
                break
            j = text.find("(", i)
            line_start = text.rfind("\n", 0, i) + 1
            if j > 0 and "\n" not in text[i:j] and text[line_start:i].strip() == "":
                start = max(0, text.rfind("\n", 0, max(0, j - max_context)) + 1)
                candidates.append(text[start:j + 1])
            pos = i + 4
    rng = random.Random(seed)
    rng.shuffle(candidates)
    seen, prompts = set(), []
    for c in candidates:
        if c not in seen and len(c.encode()) <= 160:
            seen.add(c)
            prompts.append(c)
        if len(prompts) == n:
            break
    return prompts
