"""docs/CONFIG.md: generated from config.py, current, and documenting exactly the keys Config accepts."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import config as C
from scripts import config_doc

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "CONFIG.md"
SCRIPT = ROOT / "scripts" / "config_doc.py"
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \| `([^`]*)` \|(.*)\|$")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def table_rows(text: str) -> list[re.Match]:
    return [m for m in map(ROW.match, text.splitlines()) if m]


def test_committed_doc_is_current():
    expected = config_doc.render(C.config_fields())
    assert DOC.is_file() and DOC.read_text() == expected, \
        "docs/CONFIG.md is stale: run `python scripts/config_doc.py` and commit the result"


def test_every_accepted_key_has_exactly_one_row():
    keys = [m.group(1) for m in table_rows(DOC.read_text())]
    assert len(keys) == len(set(keys)), "a key is documented twice"
    assert set(C.FIELDS) - set(keys) == set(), "keys Config accepts but docs/CONFIG.md lacks"
    assert set(keys) - set(C.FIELDS) == set(), "keys docs/CONFIG.md lists but Config rejects"


def test_rows_state_the_real_defaults_and_origin():
    defaults = C.Config()
    docs = {k.name: k for k in C.config_fields()}
    for m in table_rows(DOC.read_text()):
        name = m.group(1)
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(4))]   # accepts, origin, meaning
        assert json.loads(m.group(3)) == getattr(defaults, name), name
        assert cells[1] == ("ours" if docs[name].ours else "published"), name
    assert docs["sealed_air"].ours and not docs["guidance_weight"].ours


def test_every_key_is_documented():
    """Each key has a meaning, a type, and a description of the values its checker accepts."""
    for key in C.config_fields():
        assert key.doc.strip() and key.accepts.strip() and key.type, key.name
        assert not re.search(r"session ?\d|issue ?\d|benchmarks", key.doc, re.I), key.name


def test_groups_follow_declaration_order():
    sections = [k.section for k in C.config_fields()]
    seen = [s for i, s in enumerate(sections) if i == 0 or sections[i - 1] != s]
    assert len(seen) == len(set(seen)), "a group's keys are split"
    headings = re.findall(r"^## (.+)$", DOC.read_text(), re.M)
    assert headings[-len(seen):] == [config_doc.title(s) for s in seen]


def test_check_passes_when_current_and_fails_when_stale(tmp_path):
    out = tmp_path / "CONFIG.md"
    assert run_script("--check", "--out", str(out)).returncode == 1, "a missing file counts as stale"
    written = run_script("--out", str(out))
    assert written.returncode == 0, written.stderr
    assert out.read_text() == DOC.read_text()
    assert run_script("--check", "--out", str(out)).returncode == 0
    out.write_text(out.read_text().replace("| `sealed_air` |", "| `sealed_air_old` |"))
    stale = run_script("--check", "--out", str(out))
    assert stale.returncode == 1 and "python scripts/config_doc.py" in stale.stderr


def test_cell_escapes_table_and_html_syntax():
    assert config_doc.cell("int | None") == "int \\| None"
    assert config_doc.cell("out/<name>\n x") == "out/&lt;name> x"
