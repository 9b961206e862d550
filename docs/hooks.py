"""MkDocs hook: the committed figures under reports/ become part of the site at the same path, so a
page shows `![...](reports/convergence.png)` without a second copy of the image in docs/."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def on_files(files, config):
    for png in sorted((ROOT / "reports").rglob("*.png")):
        files.append(File(png.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
