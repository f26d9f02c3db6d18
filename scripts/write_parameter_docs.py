"""Write docs/parameters.md from locsort/params.py (a test checks that it is current)."""

from pathlib import Path

from locsort.params import markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(markdown())
    print(f"wrote {path}")
