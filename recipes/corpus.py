"""Text, tokenizers and token windows for the recipes; offline by default.

Default corpus: the Python standard library's own documentation, present on every machine with
Python, so nothing is downloaded.  It is made of the docstrings of the stdlib's source files
(read with ``ast``: no module is imported) and the reference-manual topics that ``pydoc``
ships (``pydoc_data/topics.py``).  Documents are ordered by path, so the corpus is the same on
every run of the same Python, and split into train / validation by a hash of each document's
name (a fixed split that does not move when documents are added).

Other sources: local text files (``file_documents``) and, for users online, a Hugging Face
dataset (``hf_texts``, optionally streaming).  Tokenizers: byte-level (vocabulary 256), a
byte-level BPE trained locally with ``tokenizers`` (deterministic, cached by a hash of its
training text and settings), or any ``transformers`` tokenizer by name or path.

Token windows: :class:`PackedWindows` (in-memory token ids; random access, so resuming at a
sample index is exact and free) and :class:`StreamingWindows` (an iterator of texts packed on
the fly; resuming re-reads the stream up to the saved position).  Both map a global sample index
to a window of ``seq_len`` tokens, which is what makes data-parallel sharding and exact resume
one line each in ``pretrain.py``.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

#: bump when the stdlib corpus builder changes (invalidates caches)
CORPUS_VERSION = 2
#: separator token of the locally trained BPE (documents are joined with it)
EOS_TOKEN = "<|endoftext|>"
Document = tuple[str, str]  # (name, text)


# -- documents ----------------------------------------------------------------------------------
def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 40]


def _pydoc_topics(root: Path) -> list[Document]:
    """The reference-manual topics shipped with ``pydoc`` (a dict of long strings)."""
    path = root / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (OSError, SyntaxError, ValueError):
        return []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            return [(f"pydoc_data/topics/{k.value}", v.value)
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                    and isinstance(v.value, str)]
    return []


def stdlib_documents(max_chars: int | None = None) -> list[Document]:
    """The standard library's docstrings (one document per source file) and pydoc topics.

    Parameters
    ----------
    max_chars
        Stop once this many characters are collected (``None``: everything, about 2.2 M
        characters on CPython 3.11).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    total = 0
    sources = sorted(root.rglob("*.py"))
    for path in sources:
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "idle_test" in rel:
            continue
        text = "\n\n".join(_docstrings(path))
        if text:
            docs.append((rel, text))
            total += len(text)
        if max_chars is not None and total >= max_chars:
            return docs
    for doc in _pydoc_topics(root):
        docs.append(doc)
        total += len(doc[1])
        if max_chars is not None and total >= max_chars:
            break
    return docs


def file_documents(patterns: Sequence[str]) -> list[Document]:
    """Every file matching the glob ``patterns`` (``**`` allowed), sorted, read as UTF-8."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)
                    if os.path.isfile(p)})
    if not paths:
        raise FileNotFoundError(f"No file matches {list(patterns)}.")
    return [(p, Path(p).read_text(encoding="utf-8", errors="ignore")) for p in paths]


def split_documents(
    docs: Iterable[Document], val_fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """``(train_texts, val_texts)``: a fixed split by a hash of each document's name."""
    train, val = [], []
    for name, text in docs:
        bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 1000
        (val if bucket < val_fraction * 1000 else train).append(text)
    if not train or not val:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of "
                         f"{len(train) + len(val)} documents; use more documents or files.")
    return train, val


def hf_texts(name: str, config: str | None, split: str, text_field: str = "text",
             streaming: bool = True) -> Callable[[], Iterator[str]]:
    """A factory of text iterators over a Hugging Face dataset split (needs ``datasets``).

    Each call starts the split from the beginning (``StreamingWindows`` restarts it on resume).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional, online path
        raise ImportError("--hf-dataset needs the `datasets` package: pip install datasets") from e

    def texts() -> Iterator[str]:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        return (ex[text_field] for ex in ds)

    return texts


def _cache_file(cache_dir: str | os.PathLike, name: str) -> Path:
    path = Path(cache_dir).expanduser() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def cached_stdlib_documents(cache_dir: str | os.PathLike,
                            max_chars: int | None = None) -> list[Document]:
    """:func:`stdlib_documents`, cached as JSON (building it parses every stdlib file)."""
    key = hashlib.sha1(json.dumps([CORPUS_VERSION, sys.version, sysconfig.get_paths()["stdlib"],
                                   max_chars]).encode()).hexdigest()[:16]
    path = _cache_file(cache_dir, f"stdlib-docs-{key}.json")
    if path.exists():
        return [tuple(d) for d in json.loads(path.read_text(encoding="utf-8"))]
    docs = stdlib_documents(max_chars)
    _atomic_write(path, lambda p: p.write_text(json.dumps(docs), encoding="utf-8"))
    return docs


# -- tokenizers ---------------------------------------------------------------------------------
class Tokenizer:
    """What the recipes need from a tokenizer: ``vocab_size``, ``eos_id`` and batch encoding."""

    name: str = ""
    vocab_size: int = 0
    eos_id: int | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocabulary 256, no training); documents are joined by two newlines."""

    name = "bytes"
    vocab_size = 256

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) + [10, 10] for t in texts]


class BPETokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (locally trained byte-level BPE, or a ``tokenizer.json``)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tail = [] if self.eos_id is None else [self.eos_id]
        return [e.ids + tail for e in self.tok.encode_batch(list(texts))]


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer by name or path (e.g. the paper's ``t5-base``)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        self.name = name
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tail = [] if self.eos_id is None else [self.eos_id]
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [x + tail for x in ids]


def train_bpe(texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike) -> BPETokenizer:
    """A byte-level BPE with ``vocab_size`` entries trained on ``texts``, cached on disk.

    Training is deterministic (same texts and settings give the same merges); the cache key is
    a hash of the texts, the settings and the ``tokenizers`` version.
    """
    import tokenizers
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as RawTokenizer

    h = hashlib.sha1(json.dumps([vocab_size, tokenizers.__version__, EOS_TOKEN]).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
    path = _cache_file(cache_dir, f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json")
    if not path.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[EOS_TOKEN], show_progress=False)
        _atomic_write(path, lambda p: bpe.save(str(p)))
    return BPETokenizer(RawTokenizer.from_file(str(path)), f"bpe{vocab_size}")


def make_tokenizer(spec: str, train_texts: Sequence[str] | None, vocab_size: int,
                   cache_dir: str | os.PathLike) -> Tokenizer:
    """``"bytes"``, ``"bpe"`` (trained on ``train_texts``), a ``tokenizer.json`` path, or a
    ``transformers`` tokenizer name / directory."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer='bpe' trains on the corpus; a streamed dataset has no "
                             "corpus in memory: pass a tokenizer name (e.g. t5-base) or a "
                             "tokenizer.json.")
        return train_bpe(train_texts, vocab_size, cache_dir)
    if spec.endswith(".json") and os.path.isfile(spec):
        from tokenizers import Tokenizer as RawTokenizer

        return BPETokenizer(RawTokenizer.from_file(spec), Path(spec).stem)
    return HFTokenizer(spec)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str],
                     chunk: int = 256) -> torch.Tensor:
    """One int32 stream of token ids: every document followed by the separator."""
    ids: list[int] = []
    for i in range(0, len(texts), chunk):
        for doc in tokenizer.encode_batch(texts[i:i + chunk]):
            ids.extend(doc)
    return torch.tensor(ids, dtype=torch.int32)


def cached_token_streams(tokenizer: Tokenizer, train: Sequence[str], val: Sequence[str],
                         cache_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, val_ids)`` int32 streams, cached by a hash of texts and tokenizer."""
    h = hashlib.sha1(tokenizer.name.encode())
    if isinstance(tokenizer, BPETokenizer):
        h.update(tokenizer.tok.to_str().encode())
    for t in (*train, "\x00split\x00", *val):
        h.update(t.encode("utf-8"))
    path = _cache_file(cache_dir, f"tokens-{h.hexdigest()[:16]}.pt")
    if path.exists():
        data = torch.load(path, weights_only=True)
        return data["train"], data["val"]
    data = {"train": encode_documents(tokenizer, train), "val": encode_documents(tokenizer, val)}
    _atomic_write(path, lambda p: torch.save(data, p))
    return data["train"], data["val"]


# -- windows ------------------------------------------------------------------------------------
class PackedWindows:
    """Non-overlapping windows of ``seq_len`` tokens over one token stream, by sample index.

    Window ``w`` is ``tokens[w * seq_len : (w + 1) * seq_len]``.  Sample ``s`` of the training
    order is window ``perm_e[s % n]`` where ``e = s // n`` is the epoch and ``perm_e`` a
    permutation seeded by ``(seed, e)`` (identity when ``shuffle=False``).  A sample index is
    therefore the whole data position: ranks read disjoint index ranges, and a resumed run
    continues at the saved index with no state to restore.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.n = len(tokens) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens make no window of seq_len={seq_len}.")
        self.windows = tokens[: self.n * seq_len].view(self.n, seq_len)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def window_ids(self, start: int, count: int) -> list[int]:
        """Window indices of samples ``start .. start + count - 1``."""
        out = []
        for s in range(start, start + count):
            epoch, i = divmod(s, self.n)
            out.append(int(self._order(epoch)[i]) if self.shuffle else i)
        return out

    def samples(self, start: int, count: int) -> torch.Tensor:
        """``(count, seq_len)`` int64 token ids of samples ``start .. start + count - 1``."""
        return self.windows[self.window_ids(start, count)].long()


class StreamingWindows:
    """Windows of ``seq_len`` tokens packed from a stream of texts, by sample index.

    Sample ``s`` is the ``s``-th window of the concatenated, tokenized stream.  Indices must
    grow (what training asks for); asking for an earlier index restarts the stream, so a resumed
    run re-reads (and re-tokenizes) the stream up to its position: exact, but not free.
    """

    def __init__(self, texts: Callable[[], Iterator[str]], tokenizer: Tokenizer, seq_len: int,
                 batch_docs: int = 64) -> None:
        self.texts, self.tokenizer, self.seq_len, self.batch_docs = (
            texts, tokenizer, seq_len, batch_docs)
        self._restart()

    def _restart(self) -> None:
        self._it = self.texts()
        self._buf: list[int] = []
        self._next = 0  # index of the next window in the stream

    def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            docs = [t for _, t in zip(range(self.batch_docs), self._it, strict=False)]
            if not docs:
                raise EOFError(f"the text stream ended after {self._next} windows")
            for ids in self.tokenizer.encode_batch(docs):
                self._buf.extend(ids)

    def _take(self) -> list[int]:
        self._fill(self.seq_len)
        window, self._buf = self._buf[: self.seq_len], self._buf[self.seq_len:]
        self._next += 1
        return window

    def samples(self, start: int, count: int) -> torch.Tensor:
        if start < self._next:
            self._restart()
        while self._next < start:
            self._take()
        return torch.tensor([self._take() for _ in range(count)], dtype=torch.long)

