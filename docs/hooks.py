"""MkDocs hooks of the documentation site (mkdocs.yml, `hooks:`); build code, not a page.

on_files: every file of bench/results/ (plots, Markdown tables, JSON, logs; not the git-ignored raw/ folder)
becomes a file of the site under results/, read from where the benchmark wrote it, so that a page links
`results/cpu-amd-epyc-2026-11-27.png` and the strict build checks the link. Nothing is copied into docs/.
The Markdown results render as pages outside the navigation, titled with their path where they have no
heading of their own (on_page_markdown).
"""

from __future__ import annotations

import os
import re

from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS_SRC = os.path.join("bench", "results")  # relative to the repository root (mkdocs.yml's folder)
RESULTS_URI = "results"  # where they appear in the site, relative to docs/
RESULT_SUFFIXES = (".png", ".svg", ".md", ".json", ".txt", ".log")


def on_files(files: Files, config) -> Files:
    root = os.path.dirname(config.config_file_path)
    folder = os.path.join(root, RESULTS_SRC)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (os.path.isfile(path) and name.endswith(RESULT_SUFFIXES)):
            continue
        inclusion = InclusionLevel.NOT_IN_NAV if name.endswith(".md") else InclusionLevel.INCLUDED
        files.append(File.generated(config, f"{RESULTS_URI}/{name}", abs_src_path=path, inclusion=inclusion))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.startswith(f"{RESULTS_URI}/") and not re.match(r"#\s", markdown):
        return f"# `{RESULTS_SRC}/{os.path.basename(page.file.src_uri)}`\n\n{markdown}"
    return markdown
