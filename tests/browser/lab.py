"""Drive JupyterLab in headless Chromium the way a person does, and report what they would see.

`JupyterServer` runs `jupyter lab` on 127.0.0.1 (a free port, a token, a throwaway config and
settings folder) and always stops with every kernel it started. `prepare_notebook` writes a copy
of a notebook with papermill's injected-parameters cell (smoke sizes, `interactive = True`).
`LabNotebook` opens a copy in a Playwright page, runs all cells from the Run menu, moves widgets
by keyboard and mouse, and reads the page: error outputs, plotly figures (their data, layout and
drawn SVG), cell text. The `problems_*` functions return what is wrong as a list of one-line
strings (empty: nothing wrong), so a test can assert both that a good notebook has none and that
a broken one has some.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nbformat
import psutil
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PR_SET_PDEATHSIG = 1  # prctl(2)
VIEWPORT = {"width": 1280, "height": 1100}  # tall enough for a three-row figure below the toolbar
STDERR_MIME = "application/vnd.jupyter.stderr"
# What an error looks like in a stderr output (error outputs render as stderr text too): an IPython
# traceback, an "ename: evalue" line, a JavaScript output that failed. Progress bars and warnings pass.
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\w+(Error|Exception): |Javascript Error", re.MULTILINE)
# JupyterLab settings for a test run: every cell attached to the page (the default windowing
# leaves off-screen cells out of the DOM), no news or update pop-ups over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterServer:
    """`jupyter lab` on 127.0.0.1 with a token, serving `root_dir`; `home` holds its config and log.

    Kernels inherit PYTHONPATH with this checkout first, so `import gdn_lab` works in them without
    an install. Use as a context manager, or call `stop()` in a `finally`: it terminates the
    server's process group and every process the server started (kernels run in sessions of
    their own), then kills what is left after `grace` seconds.
    """

    def __init__(self, root_dir: pathlib.Path, home: pathlib.Path):
        self.root_dir, self.home = pathlib.Path(root_dir), pathlib.Path(home)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "jupyter.log"
        self.process: subprocess.Popen | None = None

    def _environment(self) -> dict[str, str]:
        settings = self.home / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "JUPYTER_CONFIG_DIR": str(self.home / "config"),
            "JUPYTER_DATA_DIR": str(self.home / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
            "IPYTHONDIR": str(self.home / "ipython"),
            "OMP_NUM_THREADS": "1",
        })
        return env

    def start(self, timeout: float = 120.0) -> JupyterServer:
        """Start the server and wait until its API answers; raises RuntimeError with the log's end."""
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
                   "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:  # CI containers run as root; Jupyter refuses that unless told
            command.append("--allow-root")
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.root_dir, env=self._environment(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server, its process group and every descendant (kernels); idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            server = psutil.Process(self.process.pid)
            processes = [server, *server.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.process.pid, sig)
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(sig)
            _, processes = psutil.wait_procs(processes, timeout=grace)
            if not processes:
                break
        self.process.wait(timeout=grace)

    def __enter__(self) -> JupyterServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def api(self, method: str, path: str):
        """The JSON answer of the server's REST API at `path`."""
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Shut down every kernel the server runs (a test's notebooks), leaving the server up."""
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def lab_url(self, relative_path: str | os.PathLike) -> str:
        """The JupyterLab address that opens `relative_path` (under root_dir), token included."""
        return f"{self.url}/lab/tree/{pathlib.PurePosixPath(relative_path)}?reset&token={self.token}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _terminate_with_parent() -> None:
    """In the server's process before exec: Linux sends it SIGTERM when the test process dies, even by
    SIGKILL, so no server outlives its tests (and the server's SIGTERM handler shuts its kernels down)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def prepare_notebook(source: pathlib.Path, destination: pathlib.Path, parameters: dict) -> pathlib.Path:
    """Copy `source` to `destination` with `parameters` in papermill's injected-parameters cell.

    The notebook's own `parameters` cell stays; the injected cell right after it overrides
    those names, exactly as a papermill run does.
    """
    notebook = parameterize_notebook(load_notebook_node(str(source)), parameters)
    destination.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, destination)
    return destination


# Error outputs render as stderr text (traceback or "ename: evalue"), in cells and widget output areas;
# a widget the front end cannot show leaves its "Error displaying widget" text instead.
_PAGE_ERRORS_JS = """([stderr, pattern]) => {
    const error = new RegExp(pattern, "m");
    const texts = [...document.querySelectorAll(`[data-mime-type="${stderr}"]`)]
        .map(node => node.innerText.trim()).filter(text => error.test(text));
    const widgets = [...document.querySelectorAll(".jp-OutputArea-output")]
        .map(node => node.innerText.trim()).filter(text => text.startsWith("Error displaying widget"));
    return [...texts, ...widgets];
}"""

_PROMPTS_JS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.innerText.trim())"

# Plotly outputs are drawn by jupyterlab-plotly's renderer (.jp-RenderedPlotly), in cells and in
# widget output areas alike; the renderer's node becomes the plot (.js-plotly-plot) once drawn.
_FIGURES_JS = """() => [...document.querySelectorAll(".jp-RenderedPlotly")]
    .map((output, index) => {
        const plot = output.matches(".js-plotly-plot") ? output : output.querySelector(".js-plotly-plot");
        const box = plot ? plot.getBoundingClientRect() : {width: 0, height: 0};
        return {
            index,
            plot: Boolean(plot),
            svg: Boolean(plot && plot.querySelector("svg.main-svg")),
            gl: Boolean(plot && plot.querySelector("canvas")),
            traces: plot && plot.data ? plot.data.length : 0,
            width: box.width,
            height: box.height,
            title: plot && plot.layout && plot.layout.title ? String(plot.layout.title.text || "") : "",
        };
    })"""

# What a figure shows: its data (typed arrays as lists), title and shapes, and the geometry it drew
# (trace paths, heatmap images, shapes; not the hover layer). Two states differ when a person would
# see a different figure.
_FIGURE_STATE_JS = """(plot) => {
    const plain = (key, value) => ArrayBuffer.isView(value) ? Array.from(value) : value;
    const layout = plot.layout || {};
    return JSON.stringify({
        data: plot.data,
        title: layout.title ? layout.title.text : null,
        shapes: layout.shapes || [],
        drawn: [...plot.querySelectorAll(".plot path, .plot image, .shapelayer path")]
            .map(node => node.getAttribute("d") || node.getAttribute("href") || ""),
    }, plain);
}"""


class LabNotebook:
    """One notebook open in JupyterLab in a Playwright `page`; `run_dir` is the folder its run writes to.
    `page_errors` collects the page's uncaught JavaScript errors (a renderer that crashed)."""

    def __init__(self, page, server: JupyterServer, relative_path: str | os.PathLike,
                 run_dir: pathlib.Path | None = None):
        self.page, self.server, self.relative_path = page, server, pathlib.PurePosixPath(relative_path)
        self.run_dir = run_dir
        self.page_errors: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def open(self, timeout: float = 120.0) -> LabNotebook:
        """Load JupyterLab with the notebook and wait until its kernel is idle."""
        self.page.goto(self.server.lab_url(self.relative_path), timeout=timeout * 1000)
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout * 1000)
        self.wait_until_idle(timeout)
        return self

    @property
    def panel(self):
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def run_all(self, timeout: float = 300.0) -> LabNotebook:
        """Run ▸ Run All Cells from the menu bar, then wait until no cell is queued or running."""
        before = self._prompts()
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        self.page.wait_for_function(f"() => ({_PROMPTS_JS})().join() !== {json.dumps(','.join(before))}",
                                    timeout=timeout * 1000, polling=100)
        return self.wait_until_idle(timeout)

    def _prompts(self) -> list[str]:
        return self.page.evaluate(_PROMPTS_JS)

    def wait_until_idle(self, timeout: float = 300.0) -> LabNotebook:
        """Wait until a kernel is connected and idle (status bar, toolbar indicator) and no cell shows `[*]`."""
        self.page.wait_for_function(
            """() => {
                const indicator = document.querySelector(".jp-Notebook-ExecutionIndicator");
                const kernel = [...document.querySelectorAll(".jp-StatusBar-TextItem")]
                    .some(item => / \\| Idle$/.test(item.innerText) && !item.innerText.startsWith("No Kernel"));
                const prompts = [...document.querySelectorAll(".jp-CodeCell .jp-InputPrompt")];
                return kernel && indicator && indicator.dataset.status === "idle"
                    && prompts.every(prompt => !prompt.innerText.includes("*"));
            }""", timeout=timeout * 1000, polling=250)
        return self

    def code_cell(self, source_fragment: str):
        """The code cell whose source contains `source_fragment` (exactly one must)."""
        cells = self.panel.locator(".jp-CodeCell").filter(
            has=self.page.locator(".jp-InputArea-editor", has_text=source_fragment))
        count = cells.count()
        if count != 1:
            raise AssertionError(f"{count} code cells contain {source_fragment!r}; the test needs exactly one")
        return cells

    def run_cell(self, cell, timeout: float = 120.0) -> None:
        """Click into `cell` and press Shift+Enter, as a person re-runs one cell; wait until it ran."""
        prompt = cell.locator(".jp-InputPrompt")
        before = prompt.inner_text()
        cell.locator(".jp-InputArea-editor").click()
        self.page.keyboard.press("Shift+Enter")
        self.page.wait_for_function("([node, before]) => node.innerText !== before && /\\d/.test(node.innerText)",
                                    arg=[prompt.element_handle(), before], timeout=timeout * 1000)
        self.wait_until_idle(timeout)

    def error_outputs(self) -> list[str]:
        """The text of every output on the page that shows an error (cells and widget output areas)."""
        texts = self.page.evaluate(_PAGE_ERRORS_JS, [STDERR_MIME, ERROR_TEXT.pattern])
        return list(dict.fromkeys(texts))

    def figures(self) -> list[dict]:
        """Every plotly output on the page: whether a plot with an SVG or a GL canvas was drawn, its size and traces."""
        return self.page.evaluate(_FIGURES_JS)

    def wait_for_figures(self, count: int, timeout: float = 60.0) -> None:
        """Wait until at least `count` plotly outputs have drawn their SVG."""
        self.page.wait_for_function(
            "(count) => document.querySelectorAll('.jp-RenderedPlotly svg.main-svg').length >= count",
            arg=count, timeout=timeout * 1000)

    def figure_state(self, scope) -> str | None:
        """What the plotly figure inside `scope` (a locator) shows now, as a string; None without one."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        plot = scope.locator(".js-plotly-plot").last
        if plot.count() == 0:
            return None
        try:  # a redraw may clear the output between count() and evaluate(): then there is no figure
            return plot.evaluate(_FIGURE_STATE_JS, timeout=2_000)
        except PlaywrightTimeoutError:
            return None

    def widget(self, scope, description: str):
        """The ipywidgets control labelled `description` inside `scope`."""
        return scope.locator(".widget-inline-hbox").filter(
            has=self.page.locator(f'label.widget-label:text-is("{description}")'))

    def widget_box(self, scope, heading: str):
        """The box of widgets inside `scope` that shows the text `heading` (a config panel's class name)."""
        return scope.locator(".widget-vbox").filter(has=self.page.get_by_text(heading, exact=True))

    def press_slider(self, scope, description: str, key: str = "ArrowRight", times: int = 1) -> None:
        """Focus the handle of slider `description` and press `key` (ArrowRight, ArrowLeft, End, Home)."""
        handle = self.widget(scope, description).locator(".noUi-handle")
        handle.focus()
        for _ in range(times):
            handle.press(key)

    def slider_readout(self, scope, description: str) -> str:
        return self.widget(scope, description).locator(".widget-readout").inner_text().strip()

    def select(self, scope, description: str, option: str) -> None:
        """Pick `option` in dropdown `description`."""
        self.widget(scope, description).locator("select").select_option(label=option)

    def dropdown_options(self, scope, description: str) -> list[str]:
        return [text.strip() for text in self.widget(scope, description).locator("option").all_inner_texts()]

    def type_number(self, scope, description: str, value) -> None:
        """Type `value` into number box `description` and press Enter (the value reaches the kernel)."""
        box = self.widget(scope, description).locator("input")
        box.fill(str(value))
        box.press("Enter")

    def output_text(self, cell) -> str:
        return cell.locator(".jp-OutputArea").inner_text()


class Screenshots:
    """PNG screenshots of page regions in `run_dir`; copied to `docs_dir` too when it is given.

    A copy for docs/ must stay under `max_docs_bytes` (screenshot an element, not the page).
    """

    def __init__(self, run_dir: pathlib.Path, docs_dir: pathlib.Path | None = None, max_docs_bytes: int = 150_000):
        self.run_dir, self.docs_dir, self.max_docs_bytes = pathlib.Path(run_dir), docs_dir, max_docs_bytes

    def save(self, locator, name: str) -> pathlib.Path:
        """Screenshot `locator` (a Playwright locator) as `<name>.png`; returns the run-directory copy."""
        path = self.run_dir / f"{name}.png"
        # centred in the viewport, clear of JupyterLab's toolbar; the mouse away, so no plotly modebar shows
        locator.evaluate("node => node.scrollIntoView({block: 'center'})")
        locator.page.mouse.move(0, 0)
        locator.page.screenshot(path=path, clip=locator.bounding_box(), animations="disabled")
        if self.docs_dir is not None:
            size = path.stat().st_size
            if size > self.max_docs_bytes:
                raise ValueError(f"screenshot {name} is {size // 1000} KB, over {self.max_docs_bytes // 1000} KB "
                                 f"for docs/; screenshot a smaller element")
            self.docs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.docs_dir / path.name)
        return path


def problems_on_page(notebook: LabNotebook, min_figures: int = 0) -> list[str]:
    """What a person would see as broken: error outputs, plotly outputs without a drawn plot (or
    drawn tiny, or empty), fewer plotly figures than `min_figures`, uncaught JavaScript errors."""
    problems = [f"error output: {_first_lines(text)}" for text in notebook.error_outputs()]
    problems += [f"JavaScript error: {error}" for error in notebook.page_errors]
    figures = notebook.figures()
    for figure in figures:
        if not (figure["plot"] and (figure["svg"] or figure["gl"])):
            problems.append(f"plotly output {figure['index']} ({figure['title']!r}) drew no SVG or GL canvas")
        elif figure["width"] < 50 or figure["height"] < 50:
            problems.append(f"plotly output {figure['index']} ({figure['title']!r}) is drawn "
                            f"{figure['width']:.0f} x {figure['height']:.0f} px")
        elif figure["traces"] == 0:
            problems.append(f"plotly output {figure['index']} ({figure['title']!r}) has no traces")
    if len(figures) < min_figures:
        problems.append(f"{len(figures)} plotly figures on the page; expected at least {min_figures}")
    return problems


def problems_after_widget_change(notebook: LabNotebook, scope, change, what: str, timeout: float = 20.0,
                                 read=None) -> list[str]:
    """Call `change()` (it moves a widget inside `scope`) and report what went wrong: what `scope`
    shows did not change within `timeout` seconds, or an error output appeared on the page.

    `read()` returns what `scope` shows (default: the state of its plotly figure). A callback that
    raises inside an Output widget shows a traceback (an error output); one that raises outside
    any output area shows nothing and leaves the old view: both are reported.
    """
    read = read or (lambda: notebook.figure_state(scope))
    before_errors = set(notebook.error_outputs())
    before = read()
    if before is None:
        return [f"{what}: nothing to watch before the change (no figure in the cell)"]
    change()
    problems, after = [], before
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notebook.wait_until_idle(timeout)
        after = read()
        new_errors = [text for text in notebook.error_outputs() if text not in before_errors]
        if new_errors:
            problems += [f"{what}: error output: {_first_lines(text)}" for text in new_errors]
            break
        if after is not None and after != before:
            break
        notebook.page.wait_for_timeout(250)
    if after is None:
        problems.append(f"{what}: the view disappeared")
    elif after == before:
        problems.append(f"{what}: the view did not change within {timeout:.0f} s")
    return problems


_STATIC_PAGE_JS = """() => [...document.querySelectorAll(".js-plotly-plot")].map(plot => {
    const box = plot.getBoundingClientRect();
    return {svg: Boolean(plot.querySelector("svg.main-svg")), gl: Boolean(plot.querySelector("canvas")),
            traces: plot.data ? plot.data.length : 0, width: box.width, height: box.height};
})"""


def open_static_page(page, path: pathlib.Path) -> list[str]:
    """Open a saved figure page via file:// with every other scheme blocked; returns the blocked addresses."""
    blocked = []

    def only_files(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    page.goto(pathlib.Path(path).resolve().as_uri(), wait_until="load")
    return blocked


def problems_in_static_page(page, path: pathlib.Path, traces: int | None = None) -> list[str]:
    """Open `path` (a `gdn_lab.viz.save_html` page) in `page` without a server or network, and report
    what a reader would see as broken: plotly.js not loaded, no figure drawn, fewer traces than
    `traces`, a figure drawn too small, JavaScript errors, requests that left the file system."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    blocked = open_static_page(page, path)
    problems = [f"{path.name}: request outside the file system: {url}" for url in blocked]
    if not page.evaluate("() => typeof window.Plotly === 'object'"):
        problems.append(f"{path.name}: plotly.js did not load (is plotly.min.js beside the page?)")
    else:
        try:
            page.wait_for_function(
                "() => document.querySelector('.js-plotly-plot svg.main-svg, .js-plotly-plot canvas')", timeout=30_000)
        except PlaywrightTimeoutError:
            problems.append(f"{path.name}: plotly.js loaded but drew nothing within 30 s")
    plots = page.evaluate(_STATIC_PAGE_JS)
    if not plots:
        problems.append(f"{path.name}: no plotly figure on the page")
    for plot in plots:
        if not (plot["svg"] or plot["gl"]):
            problems.append(f"{path.name}: a figure drew no SVG or GL canvas")
        elif plot["width"] < 50 or plot["height"] < 50:
            problems.append(f"{path.name}: a figure is drawn {plot['width']:.0f} x {plot['height']:.0f} px")
        if traces is not None and plot["traces"] != traces:
            problems.append(f"{path.name}: {plot['traces']} traces drawn, the figure has {traces}")
    problems += [f"{path.name}: JavaScript error: {error}" for error in errors]
    return problems


def _first_lines(text: str, count: int = 6, width: int = 200) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    tail = lines[-count:]
    return " | ".join(line[:width] for line in tail)
