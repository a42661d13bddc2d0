"""Show the notebooks' "Open in Colab" badge from the book itself, so a page is whole without a network.

Each notebook's first cell shows the badge as a Markdown image whose source is
Colab's own SVG on colab.research.google.com. In a book opened offline (a
workshop room, a downloaded copy) that image is broken. This extension swaps
the remote source for the copy in ``book/_static`` while a page is read, before
Sphinx collects its images, so Sphinx copies the local file into the build like
any other image. The notebooks keep the remote badge (it is what GitHub and
Colab show), and the link around the badge is untouched: it still opens the
notebook in Colab.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform

REMOTE_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
# A leading slash makes Sphinx read the path from the book's source folder, whatever the page's folder.
LOCAL_BADGE = "/_static/colab-badge.svg"


class LocalColabBadge(SphinxTransform):
    """Point every image whose source is Colab's remote badge at the book's local copy."""

    default_priority = 500  # any time while the page is parsed: images are collected after all transforms

    def apply(self, **kwargs: Any) -> None:
        """Rewrite the source of each remote badge image in the page being read."""
        for image in self.document.findall(nodes.image):
            if image["uri"] == REMOTE_BADGE:
                image["uri"] = LOCAL_BADGE


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the transform; it keeps no state, so parallel reading and writing are safe."""
    app.add_transform(LocalColabBadge)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
