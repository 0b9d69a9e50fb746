"""scripts/train_reference.py's data handling, without training (the run itself is minutes long)."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_file_list_is_sorted_disjoint_and_matches_the_shipped_manifest(tr):
    import sys

    from nexusrt.models.shipped import SHIPPED, read_manifest

    trained_on = read_manifest(SHIPPED["stdlib-tiny"])["python_version"]
    if trained_on.rsplit(".", 1)[0] != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the list names CPython {trained_on}'s stdlib files; this is {sys.version.split()[0]}")
    train, held = tr.read_file_list(Path(sysconfig.get_paths()["stdlib"]))
    assert len(train) > 100 and len(held) >= 5 and not set(train) & set(held)
    assert sorted(held) == held
    data = read_manifest(SHIPPED["stdlib-tiny"])["data"]
    assert data == {"train": train, "eval": held}  # the shipped model was trained on exactly this list


def test_missing_files_stop_the_script_naming_them(tr, tmp_path):
    (tmp_path / "bisect.py").write_text("x = 1\n")
    with pytest.raises(SystemExit) as exc:
        tr.read_file_list(tmp_path)
    msg = str(exc.value)
    assert "listed file(s) missing" in msg and "heapq.py" in msg and "bisect.py" not in msg.split(":", 1)[1]


def test_docstring_chats_and_windows(tr):
    source = 'def walk(top):\n    """Walk a directory tree, yielding each directory."""\n\ndef _hidden():\n    """Not public."""\n'
    chats = tr.docstring_chats(source, "os")
    assert chats == ["<|bos|><|user|>\nWhat does os.walk do?<|end|>\n<|assistant|>\n"
                     "Walk a directory tree, yielding each directory.<|end|>\n<|eos|>"]
    w = tr.windows(list(range(23)), 5)
    assert w.shape == (4, 6) and w[1].tolist() == [5, 6, 7, 8, 9, 10]  # inputs + the next-token target
