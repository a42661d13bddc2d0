"""The Jupyter Book's wiring: the notebooks in the TOC, the Colab links, offline pages, and the quoted error messages.

`make book` builds the book with warnings as errors; these tests check what a
build does not: that the Colab launch buttons open the real notebooks on
GitHub, that the built book needs no network (formulas and badges come from the
build, not from a CDN), and that every error message the troubleshooting page
quotes is still the one the code raises with the pinned stack.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import nbformat
import pandas as pd
import pytest
import torch
import yaml
from peft import get_peft_model

from qlora_tutorial.data import load_ag_news
from qlora_tutorial.distributed import REPOSITORY
from qlora_tutorial.errors import MissingInputError
from qlora_tutorial.gguf_conversion import check_gguf_reader
from qlora_tutorial.modeling import check_head_not_quantized, load_classifier, reference_lora_config
from qlora_tutorial.settings import Settings, compute_dtype_for, get_profile, load_settings
from qlora_tutorial.sources import packaged_smollm2_gguf

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO / "book"
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(BOOK / "_ext"))

from local_colab_badge import LOCAL_BADGE, REMOTE_BADGE  # noqa: E402
from notebook_io import series  # noqa: E402

CONFIG = yaml.safe_load((BOOK / "_config.yml").read_text(encoding="utf-8"))
TOC = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
TROUBLESHOOTING = (BOOK / "troubleshooting.md").read_text(encoding="utf-8")
PLACEHOLDER_DIR = "/path/to/ag_news"


def toc_entries() -> list[dict[str, str]]:
    return [TOC] + [chapter for part in TOC["parts"] for chapter in part["chapters"]]


def notebook_pages() -> list[str]:
    """The page names of the notebooks, as the TOC's glob picks them (page names have no suffix)."""
    globs = [entry["glob"] for entry in toc_entries() if "glob" in entry]
    return [
        f"notebooks/{path.stem}"
        for path in series()
        if any(fnmatch.fnmatch(f"notebooks/{path.stem}", pattern) for pattern in globs)
    ]


def test_notebooks_enter_the_book_through_the_link() -> None:
    link = BOOK / "notebooks"
    assert link.is_symlink() and link.readlink() == Path("../notebooks")


def test_every_notebook_of_the_series_is_in_the_toc() -> None:
    assert notebook_pages() == [f"notebooks/{path.stem}" for path in series()]


def test_every_page_file_exists() -> None:
    files = [entry.get("file", entry.get("root")) for entry in toc_entries() if "glob" not in entry]
    assert all((BOOK / f"{name}.md").is_file() for name in files), files


def test_the_book_never_executes_notebooks() -> None:
    assert CONFIG["execute"]["execute_notebooks"] == "off"


def repository_slug() -> tuple[str, str]:
    """``owner/name`` and the branch of the one repository URL, book/_config.yml's."""
    url = CONFIG["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    return url.removeprefix("https://github.com/"), CONFIG["repository"]["branch"]


PROSE = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted(BOOK.glob("*.md"))]
REPOSITORY_LINKS = {
    "Colab link": re.compile(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w.-]+)/"),
    "raw file": re.compile(r"raw\.githubusercontent\.com/([\w.-]+/[\w.-]+)/([\w.-]+)/"),
    "clone": re.compile(r"git clone https://github\.com/([\w.-]+/[\w.-]+)()"),
    "pip from git": re.compile(r"git\+https://github\.com/([\w.-]+/[\w.-]+)()"),
}


@pytest.mark.parametrize("path", PROSE, ids=lambda path: path.name)
def test_every_link_to_the_repository_names_the_configured_one(path: Path) -> None:
    """Colab links, raw files, clone and pip lines in the prose all open the repository of book/_config.yml."""
    slug, branch = repository_slug()
    text = path.read_text(encoding="utf-8")
    for kind, pattern in REPOSITORY_LINKS.items():
        for found_slug, found_branch in pattern.findall(text):
            assert found_slug == slug, f"{path.name}: a {kind} names {found_slug}, book/_config.yml {slug}"
            assert found_branch in ("", branch), f"{path.name}: a {kind} names branch {found_branch}, not {branch}"


def test_the_readme_opens_every_notebook_in_colab() -> None:
    slug, branch = repository_slug()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for path in series():
        link = f"(https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{path.name})"
        assert link in readme, f"README.md should open {path.name} in Colab with {link}"


def test_the_package_names_the_configured_repository() -> None:
    assert CONFIG["repository"]["url"] == REPOSITORY


def test_the_book_knows_where_it_is_published() -> None:
    """html.baseurl is the GitHub Pages site of the repository, where .github/workflows/book.yml deploys."""
    owner, name = repository_slug()[0].split("/")
    assert CONFIG["html"]["baseurl"] == f"https://{owner}.github.io/{name}/"


@pytest.mark.parametrize("path", PROSE, ids=lambda path: path.name)
def test_every_link_to_the_published_book_is_html_baseurl(path: Path) -> None:
    for site in re.findall(r"https://[\w.-]+\.github\.io/[\w.-]*/?", path.read_text(encoding="utf-8")):
        assert site == CONFIG["html"]["baseurl"], f"{path.name} links to {site}, the book is at html.baseurl"


@pytest.mark.parametrize("page", notebook_pages())
def test_colab_launch_button_opens_the_notebook_itself(page: str) -> None:
    """sphinx-book-theme links to {url}/blob/{branch}/{path_to_book}/{page}.ipynb: that must be the real file."""
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    prefix = CONFIG["repository"]["path_to_book"].strip("/")
    in_repository = f"{prefix}/{page}.ipynb" if prefix else f"{page}.ipynb"
    target = REPO / in_repository
    assert in_repository.startswith("notebooks/"), in_repository
    assert target.is_file() and not any(parent.is_symlink() for parent in [target, *target.parents])


def test_math_is_served_by_the_book_not_a_cdn() -> None:
    """sphinx-mathjax-offline copies MathJax into the build; without it the formulas load from a CDN."""
    assert "sphinx-mathjax-offline" in CONFIG["sphinx"]["extra_extensions"]
    assert "mathjax_path" not in CONFIG["sphinx"].get("config", {}), "a mathjax_path here would override the extension"


def test_every_notebook_badge_is_the_one_the_book_serves_locally() -> None:
    """The extension swaps exactly Colab's badge URL for the local SVG: another URL would stay broken offline."""
    assert CONFIG["sphinx"]["local_extensions"] == {"local_colab_badge": "_ext"}
    assert (BOOK / LOCAL_BADGE.lstrip("/")).is_file()
    for path in series():
        first = nbformat.read(path, as_version=4).cells[0]
        assert "(https://colab.research.google.com/github/" in first.source, path.name
        assert f"]({REMOTE_BADGE})" in first.source, path.name


@pytest.mark.slow
def test_built_book_works_offline(tmp_path: Path) -> None:
    """Build the book as `make book` does and check its pages load nothing from another host.

    Every script is a local file of the build (MathJax included), every badge
    image is the local copy, and the badges still link to Colab.
    """
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", str(BOOK), "--path-output", str(tmp_path)]
    subprocess.run([*command, "--warningiserror", "--nitpick", "--keep-going"], check=True, capture_output=True)
    html = tmp_path / "_build" / "html"
    pages = {path: path.read_text(encoding="utf-8") for path in html.rglob("*.html")}
    scripts = {(path, src) for path, text in pages.items() for src in re.findall(r'<script[^>]*src="([^"]+)"', text)}
    assert not [src for _, src in scripts if re.match(r"(https?:)?//", src)]
    mathjax = [(path, src) for path, src in scripts if "mathjax" in src.lower()]
    assert mathjax, "no page loads MathJax: the formulas would not render"
    assert all((path.parent / src.split("?")[0]).is_file() for path, src in mathjax)
    for path in series():
        page = pages[html / "notebooks" / f"{path.stem}.html"]
        badges = re.findall(r'<a[^>]*href="([^"]+)"[^>]*><img alt="Open In Colab" src="([^"]+)"', page)
        assert badges, path.name
        for link, src in badges:
            assert link.startswith("https://colab.research.google.com/github/"), link
            assert not re.match(r"(https?:)?//", src) and (html / "notebooks" / src).resolve().is_file(), src


def quoted(message: str) -> bool:
    return message in TROUBLESHOOTING


def test_quoted_settings_errors_are_current(tmp_path: Path, fake_t4: None) -> None:
    with pytest.raises(ValueError) as unknown:
        get_profile("laptop")
    with pytest.raises(FileNotFoundError) as no_folder:
        load_settings("smoke", data_dir=tmp_path / "ag_news")
    with pytest.raises(ValueError) as t4:
        compute_dtype_for("cuda", torch.bfloat16)
    assert quoted(f"ValueError: {unknown.value}")
    assert quoted(f"FileNotFoundError: {no_folder.value}".replace(str(tmp_path / "ag_news"), PLACEHOLDER_DIR))
    assert quoted(f"ValueError: {t4.value}")


def test_quoted_data_errors_are_current(tmp_path: Path) -> None:
    folder = tmp_path / "ag_news"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as missing:
        load_ag_news(folder)
    wrong = pd.DataFrame({"sentence": ["Shares fell."], "label": [2]})
    for split in ("train", "test"):
        wrong.to_parquet(folder / f"{split}.parquet")
    with pytest.raises(ValueError) as columns:
        load_ag_news(folder)
    assert quoted(f"FileNotFoundError: {missing.value}".replace(str(folder), PLACEHOLDER_DIR))
    assert quoted(f"ValueError: {columns.value}".replace(str(folder), PLACEHOLDER_DIR))


def test_quoted_decoder_errors_are_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(MissingInputError) as no_package:
        packaged_smollm2_gguf()
    with pytest.raises(MissingInputError) as no_reader:
        check_gguf_reader()
    assert quoted(f"MissingInputError: {no_package.value}")
    assert quoted(f"MissingInputError: {no_reader.value}")


def test_quoted_head_check_is_current() -> None:
    model = torch.nn.Module()
    model.classifier = bnb.nn.Linear4bit(4, 4)
    with pytest.raises(ValueError) as head:
        check_head_not_quantized(model)
    assert quoted(f"ValueError: {head.value}")


def test_quoted_library_messages_are_current(
    tiny_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The transformers, bitsandbytes and PEFT messages, reproduced on the tiny BERT in 4 bit."""
    model = load_classifier(tiny_settings, "nf4")
    with pytest.raises(ValueError) as half:
        model.half()
    with pytest.raises(ValueError) as cast:
        model.to(torch.float16)
    assert quoted(f"ValueError: {half.value}")
    assert quoted(f"ValueError: {cast.value}")

    # The trap needs a head that is new (not in the checkpoint), as with a pretrained encoder.
    load_classifier(tiny_settings, "fp32").bert.save_pretrained(tmp_path / "encoder")
    encoder_only = replace(tiny_settings, model_name=str(tmp_path / "encoder"))
    quantized_head = load_classifier(encoder_only, "nf4", skip_modules=None)
    capsys.readouterr()
    with pytest.raises(AssertionError):
        quantized_head(input_ids=torch.tensor([[101, 2023, 102]]))
    assert quoted(capsys.readouterr().out.strip() + "\nAssertionError\n")

    adapted = get_peft_model(model, reference_lora_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted.merge_and_unload()
    assert caught and all(quoted(f"{w.category.__name__}: {w.message}") for w in caught)


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_intro_profile_table_matches_the_profiles(name: str) -> None:
    """The intro's table of profiles states each profile's rows and epochs as settings.py defines them."""
    intro = (BOOK / "intro.md").read_text(encoding="utf-8")
    row = next(line for line in intro.splitlines() if line.startswith(f"| `{name}` |"))
    profile = get_profile(name)
    epochs = f"{profile.epochs:g} epoch" + ("" if profile.epochs == 1 else "s")
    assert epochs in row
    if profile.train_pool_rows is not None:
        train = round(profile.train_pool_rows * (1 - profile.validation_fraction))
        assert f"{profile.train_pool_rows:,} training rows ({train:,} train" in row
    if profile.test_rows is not None:
        assert f"{profile.test_rows:,} test rows" in row
