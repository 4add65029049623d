"""The offline default corpus: docstrings of the Python standard library.

Every machine with Python has this text; nothing is downloaded.  Docstrings are read with
``ast`` from the stdlib's source files (no module is imported), ordered by file path so the
corpus is the same on every run of the same Python, and split into train / validation by a
hash of the file path (a fixed split that does not move when files are added).
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

import torch


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 40]


def stdlib_texts(max_chars: int = 4_000_000, val_fraction: float = 0.05) -> tuple[str, str]:
    """``(train_text, val_text)`` from the standard library's docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, total = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "idle_test" in rel:
            continue
        text = "\n\n".join(_docstrings(path))
        if not text:
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 1000
        (val if bucket < val_fraction * 1000 else train).append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(train), "\n\n".join(val)


def byte_tokens(text: str) -> torch.Tensor:
    """Byte-level token ids (vocabulary 256): no tokenizer to train or download."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of ``tokens`` (deterministic for ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=g)
        yield torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
