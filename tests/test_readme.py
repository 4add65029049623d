"""Every fenced ``python`` block of README.md and recipes/README.md runs as written: the blocks
of a file, in order, as one script in a fresh interpreter and an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "recipes/README.md"]
#: a fence opening ```python (possibly indented, inside a list item) up to its closing fence
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced python blocks of a markdown text, dedented."""
    return [textwrap.dedent(m["body"]) for m in BLOCK.finditer(text)]


def test_block_extraction_sees_indented_and_plain_fences():
    text = ("intro\n```python\nx = 1\n```\n- item\n\n  ```python\n  y = x + 1\n  ```\n"
            "```bash\nnot python\n```\n")
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def test_readme_has_the_blocks_users_copy():
    blocks = python_blocks((ROOT / "README.md").read_text())
    joined = "\n".join(blocks)
    assert len(blocks) >= 5
    for needle in ("create_optimizer", "optimizer_cls_and_kwargs", "tc.attach",
                   "RefreshScheduler", "state_bytes", "sst.merge"):
        assert needle in joined, needle


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks((ROOT / d).read_text())])
def test_every_python_block_runs_verbatim(doc, tmp_path):
    blocks = python_blocks((ROOT / doc).read_text())
    script = "\n".join(f"# --- block {i} of {doc}\n{b}" for i, b in enumerate(blocks, 1))
    (tmp_path / "readme_blocks.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "readme_blocks.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"a python block of {doc} fails as written:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    if doc == "README.md":  # the promised output of state_bytes, before and after a step
        assert "no optimizer state yet" in result.stdout and "B/param" in result.stdout
