"""Fixtures of the browser tier: one JupyterLab server and one headless Chromium per test session.

The server serves a temporary copy of `notebooks/` (the checkout stays clean) and is stopped in
the fixture's teardown, which pytest runs also when a test fails or is interrupted. Every test
gets a fresh browser context (no shared cookies or storage); its kernels are shut down after it.
Chromium is Debian's (`.ci/install_browser.sh`); Playwright only drives it, it downloads nothing.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil

import pytest

from gdn_lab.runner import load_smoke_params

from .lab import CHROMIUM_ARGS, REPO_ROOT, VIEWPORT, JupyterServer, LabNotebook, Screenshots, prepare_notebook

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
CHROMIUM = pathlib.Path(os.environ.get("GDN_LAB_CHROMIUM", "/usr/bin/chromium"))


def pytest_collection_modifyitems(config, items):
    """Every test under tests/browser/ carries the `browser` marker (`-m "not browser"` skips the tier)."""
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory) -> pathlib.Path:
    """A temporary copy of notebooks/: the folder JupyterLab serves."""
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root


@pytest.fixture(scope="session")
def jupyter_server(lab_root, tmp_path_factory):
    """`jupyter lab` on 127.0.0.1 with a token, serving `lab_root`; always stopped at the end."""
    server = JupyterServer(lab_root, tmp_path_factory.mktemp("jupyter"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (the dev extra's `playwright`; imported here, so
    that the other tiers run without it)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        message = f"no Chromium at {CHROMIUM}: run .ci/install_browser.sh (or set GDN_LAB_CHROMIUM)"
        if os.environ.get("GDN_LAB_REQUIRE_BROWSER"):  # CI: the tier must run, never skip
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def browser_page(browser, server: JupyterServer):
    """A page in a fresh browser context; on exit the context closes and the server's kernels shut down."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield context.new_page()
    finally:
        context.close()
        server.shutdown_kernels()


@pytest.fixture
def page(browser, jupyter_server):
    with browser_page(browser, jupyter_server) as page:
        yield page


@pytest.fixture(scope="module")
def module_page(browser, jupyter_server):
    """One page shared by the tests of a module (one notebook run, several checks)."""
    with browser_page(browser, jupyter_server) as page:
        yield page


@pytest.fixture
def file_page(browser):
    """A page in a fresh browser context for file:// pages (no Jupyter server)."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield context.new_page()
    finally:
        context.close()


def open_lab_notebook(page, server: JupyterServer, lab_root: pathlib.Path, name: str | pathlib.Path,
                      run_dir: pathlib.Path | None = None, **parameters) -> LabNotebook:
    """Open a notebook in JupyterLab, kernel idle, nothing run yet.

    `name` is a notebook stem under notebooks/ ("01_layer_internals"): a copy is opened whose
    injected-parameters cell holds its ci_params.yml smoke values, `run_dir`, `interactive = True`
    and `parameters`. A path under `lab_root` opens that notebook as it is.
    """
    if isinstance(name, pathlib.Path):
        return LabNotebook(page, server, name.relative_to(lab_root)).open()
    smoke = load_smoke_params(lab_root / "ci_params.yml").get(name, {})
    values = {**smoke, "run_dir": str(run_dir), "interactive": True, **parameters}
    path = prepare_notebook(lab_root / f"{name}.ipynb", lab_root / f"browser_{name}.ipynb", values)
    return LabNotebook(page, server, path.relative_to(lab_root), run_dir).open()


@pytest.fixture
def open_notebook(page, jupyter_server, lab_root, tmp_path):
    """`open_notebook(name, **parameters)`: open_lab_notebook in this test's page, run_dir in tmp_path."""
    return lambda name, **parameters: open_lab_notebook(page, jupyter_server, lab_root, name,
                                                        tmp_path / "run", **parameters)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Screenshots:
    """Screenshots under the pytest run directory; also copied to $GDN_LAB_SCREENSHOTS when set
    (e.g. GDN_LAB_SCREENSHOTS=docs/screenshots, relative to the repository root)."""
    docs = os.environ.get("GDN_LAB_SCREENSHOTS")
    return Screenshots(tmp_path_factory.mktemp("screenshots"), REPO_ROOT / docs if docs else None)
