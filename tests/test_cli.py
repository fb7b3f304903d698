import json
import subprocess
import sys

from scaledl.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert name in out


def test_python_dash_m_runs():
    out = subprocess.run(
        [sys.executable, "-m", "scaledl", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out


def test_bad_input_is_one_clear_line(capsys):
    code = main(["demo", "--only", "no-such-system"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert "unknown system 'no-such-system'" in err[0]
    assert "Traceback" not in err[0]


def test_debug_shows_traceback(capsys):
    assert main(["demo", "--only", "no-such-system", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_demo_json_foundation(capsys):
    assert main(["demo", "--only", "foundation", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["systems"]
    assert row["status"] == "ok"
    assert row["figures"]["sums"] == [3.0, 3.0]


def test_import_scaledl_stays_light():
    code = (
        "import sys, scaledl, scaledl.cli, scaledl.distributed;"
        "heavy = [m for m in ('transformers', 'monai', 'skimage', 'pydicom', 'nibabel',"
        " 'sklearn', 'matplotlib') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
