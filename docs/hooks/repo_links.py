"""MkDocs hook: links from a page to files of the repository outside docs/ (the chart's README, the
benchmarks' results, SECURITY.md) are checked to exist and pointed at the repository, so `--strict`
catches them when they rot, as it does for links between pages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

# [text](target) outside code spans; the target is relative, has no scheme and is not an anchor.
_LINK = re.compile(r"(?<!`)\]\((?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_dir = (docs_dir / page.file.src_path).parent
    repo_url = str(config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(1)
        path, _, anchor = target.partition("#")
        resolved = (page_dir / path).resolve()
        if resolved.is_relative_to(docs_dir):
            return match.group(0)  # a page: MkDocs checks it
        if not resolved.is_relative_to(root) or not resolved.exists():
            raise PluginError(f"{page.file.src_path}: link to {target!r}, which is not in the repository")
        kind = "tree" if resolved.is_dir() else "blob"
        url = f"{repo_url}/{kind}/main/{resolved.relative_to(root).as_posix()}"
        return f"]({url}{'#' + anchor if anchor else ''})"

    return _LINK.sub(rewrite, markdown)
