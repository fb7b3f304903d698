"""List the benchmarks under bench/ with their one-line summary and how to run them."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    scripts = sorted(
        p for p in HERE.glob("*.py") if p.name not in {"common.py", "link.py", "list.py"}
    )
    print("Benchmarks (results are recorded in docs/benchmarks.md):\n")
    if not scripts:
        print("  (none yet)")
    for p in scripts:
        doc = ast.get_docstring(ast.parse(p.read_text())) or "(no description)"
        print(f"  {p.name}: {doc.strip().splitlines()[0]}")
        print(f"      run: PYTHONPATH=src python bench/{p.name} --help")
    print(
        "\nOn a GPU machine whose Python already has torch: pip install --no-deps -e . "
        "(or PYTHONPATH=src), then run the script; JSON lands in bench/results/."
    )


if __name__ == "__main__":
    main()
