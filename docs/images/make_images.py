"""Draw the plots shown in the documentation: ``python docs/images/make_images.py``.

Runs the plotting examples of the guides, the ``python`` blocks of the
sections named in ``SECTIONS``, in order, in one namespace, with this folder
as the working directory: they write ranking.png, ranking_ground_truth.png
and evaluation.png here. The images are therefore drawn by exactly the code
the documentation shows (which tests/test_docs.py also runs). Afterwards the
PNGs are shrunk to a 256-colour palette. It runs on the CPU; the images are
the same on every run with the same library versions.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
#: (page, section heading): the examples that draw the images.
SECTIONS = (
    ("guides/select-model.md", "## Plotting the ranking"),
    ("guides/evaluation.md", "## Plotting an evaluation"),
)
IMAGES = ("ranking.png", "ranking_ground_truth.png", "evaluation.png")


def section_blocks(page: str, heading: str) -> list[str]:
    """The ```python blocks of one section of a docs page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    body = text[start:end if end != -1 else len(text)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def shrink(path: Path) -> None:
    """Rewrite a PNG with a 256-colour palette (the plots have few colours) and no metadata: a few tens of KB."""
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main() -> None:
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    os.chdir(HERE)
    for page, heading in SECTIONS:
        namespace: dict = {"__name__": "docs_example"}  # each page's blocks build on each other
        for code in section_blocks(page, heading):
            exec(compile(code, page, "exec"), namespace)
        plt.close("all")
    for name in IMAGES:
        shrink(HERE / name)
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size / 1024:.0f} KiB)")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
