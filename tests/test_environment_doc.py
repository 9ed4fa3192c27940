"""docs/environment.md lists every LORAMUX_* variable the package reads, and no other: a switch added
to the planner or a setting added to the server shows up there, and a removed one leaves."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "environment.md")
SOURCES = (("rust", "src"), ("python", "loramux"))
# a name in quotes: what the code passes to std::env::var, env_usize, os.environ.get
READ = re.compile(r"""["'](LORAMUX_[A-Z0-9_]+)["']""")
# a table row of the doc: | `LORAMUX_NAME` | values | what |
LISTED = re.compile(r"^\| `(LORAMUX_[A-Z0-9_]+)` \|", re.MULTILINE)


def names_read_by_the_code():
    found = {}
    for parts in SOURCES:
        for folder, _, files in os.walk(os.path.join(ROOT, *parts)):
            for name in files:
                if name.endswith((".rs", ".py")):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        for var in READ.findall(f.read()):
                            found.setdefault(var, os.path.relpath(path, ROOT))
    return found


def names_listed():
    with open(DOC, encoding="utf-8") as f:
        return LISTED.findall(f.read())


def test_the_scan_sees_the_variables_it_must():
    read = names_read_by_the_code()
    # one setting from each language, so an empty scan cannot pass
    assert "LORAMUX_KERNEL_CACHE" in read and "LORAMUX_TUNING" in read


def test_every_variable_the_code_reads_is_listed_once():
    listed = names_listed()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    missing = {var: path for var, path in names_read_by_the_code().items() if var not in listed}
    assert not missing, f"read by the code but not in docs/environment.md: {missing}"


def test_every_listed_variable_is_read_by_the_code():
    stale = sorted(set(names_listed()) - set(names_read_by_the_code()))
    assert not stale, f"in docs/environment.md but read nowhere: {stale}"
