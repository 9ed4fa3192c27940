"""Comments, test names and docs describe the code and cite what a reader can open (the TensorRT-LLM
LoRA documentation, PEFT, a paper, a section of docs/), not the project's own history: no internal
design notes, issue numbers, people or work sessions."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("python", "rust", "cuda", "tests", "benchmarks", "docs", "README.md", "Makefile")
SUFFIXES = (".py", ".pyi", ".rs", ".cu", ".cuh", ".md", ".sh", "Makefile")
HISTORY = re.compile(r"\bthe seed\b|\bseed's\b|\bof the seed\b|DESIGN\.md|\bissue \d+|\bissue #\d+|\bengineer\b|"
                     r"\bnotebook\b|\bpass \d+\b|\(lead\b", re.IGNORECASE)


def _files():
    for top in SCANNED:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield path
            continue
        for folder, _, names in os.walk(path):
            for name in names:
                if name.endswith(SUFFIXES) and name != os.path.basename(__file__):
                    yield os.path.join(folder, name)


def test_no_comment_or_doc_points_at_the_project_history():
    found = []
    for path in _files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if HISTORY.search(line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "cite a public source instead:\n" + "\n".join(found)
