"""Each lesson with widgets, in its learner's form, opened in JupyterLab in headless Chromium: all cells run in
the quick mode, every code cell ran, no cell shows an error, the widgets are drawn, and in lesson 01 moving the
t slider redraws the figure. Screenshots go to build/browser/. Run with `make test-browser`."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIDGET_LESSONS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
                        if re.search(r"ipywidgets|\binteract\(", p.read_text()))
RUN_TIMEOUT_MS = 15 * 60 * 1000  # a lesson's cells in the quick mode, on a busy two-core machine
WIDGET = "application/vnd.jupyter.widget-view+json"

# JavaScript run in the page, through the application object that JupyterLab exposes
# (--LabApp.expose_app_in_browser)
OPENED = """() => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    if (!panel || !panel.sessionContext || !panel.context || !panel.context.isReady) return false;
    const session = panel.sessionContext.session;
    return panel.sessionContext.isReady && !!session && !!session.kernel && session.kernel.status === 'idle';
}"""
RUN_ALL = """() => {
    window.courseRunAll = null;
    window.jupyterapp.commands.execute('notebook:run-all-cells')
        .then(ok => { window.courseRunAll = {ok: ok}; })
        .catch(e => { window.courseRunAll = {error: String(e)}; });
}"""
CELLS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    return panel.content.widgets.filter(c => c.model.type === 'code').map((c, i) => ({
        index: i,
        source: c.model.sharedModel.getSource(),
        count: c.model.executionCount,
        outputs: c.model.outputs.toJSON(),
    }));
}"""
KERNEL_IDLE = """() => {
    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    return kernel.status === 'idle';
}"""


def _open(browser, lab, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    # a workspace of its own, reset: only this notebook is open
    workspace = re.sub(r"\W", "-", Path(name).stem)
    page.goto(f"{lab['url']}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab['token']}",
              wait_until="domcontentloaded")
    page.wait_for_function(OPENED, timeout=180_000, polling=500)
    return page, page_errors


def _code_cell_nodes(page):
    return page.locator(".jp-Notebook .jp-CodeCell")


def _interact_cells(page, cells):
    """The DOM nodes of the code cells that call interact(...)."""
    nodes = _code_cell_nodes(page)
    return [(c["index"], nodes.nth(c["index"])) for c in cells if re.search(r"\binteract\(", c["source"])]


def _run_all(page, name):
    page.evaluate(RUN_ALL)
    page.wait_for_function("() => window.courseRunAll !== null", timeout=RUN_TIMEOUT_MS, polling=1000)
    result = page.evaluate("() => window.courseRunAll")
    assert "error" not in result, f"{name}: run all cells failed: {result}"
    page.wait_for_function(KERNEL_IDLE, timeout=120_000, polling=500)
    return page.evaluate(CELLS)


def _check_every_cell_ran_without_error(name, cells):
    code = [c for c in cells if c["source"].strip()]
    counts = sorted(c["count"] for c in code if c["count"] is not None)
    not_run = [c["index"] for c in code if c["count"] is None]
    assert not not_run, f"{name}: code cells that did not run: {not_run}"
    assert counts == list(range(1, len(code) + 1)), f"{name}: execution counts {counts}"
    errors = [(c["index"], o.get("ename"), o.get("evalue")) for c in code for o in c["outputs"]
              if o["output_type"] == "error"]
    assert not errors, f"{name}: cells that raised: {errors}"


def _check_widgets_drawn(page, name, cells):
    """Every widget output of the model is drawn in the page (no 'Error displaying widget'), and every
    interact cell shows its controls and a figure."""
    nodes = _code_cell_nodes(page)
    with_widgets = [c for c in cells if any(WIDGET in o.get("data", {}) for o in c["outputs"])]
    assert with_widgets, f"{name}: no cell displayed a widget"
    for c in with_widgets:
        cell = nodes.nth(c["index"])
        text = cell.locator(".jp-Cell-outputWrapper").inner_text()
        assert "Error displaying widget" not in text, f"{name}, code cell {c['index']}: {text[:300]}"
    interacts = _interact_cells(page, cells)
    for index, cell in interacts:
        box = cell.locator(".widget-interact")
        assert box.count() == 1, f"{name}, code cell {index}: interact drew no controls"
        controls = box.locator(".widget-slider, .widget-dropdown, .widget-text, .widget-checkbox, .widget-toggle-buttons")
        assert controls.count() >= 1, f"{name}, code cell {index}: interact has no control"
        assert controls.first.is_visible(), f"{name}, code cell {index}: its controls are hidden"
        figure = box.locator(".widget-output img")
        figure.first.wait_for(state="visible", timeout=60_000)
    return interacts


def _shoot(cell, path):
    """A screenshot of an interact cell's controls and figure."""
    box = cell.locator(".widget-interact").first
    box.scroll_into_view_if_needed()
    box.screenshot(path=str(path))


def _slider(cell, label):
    return cell.locator(".widget-slider").filter(has=cell.page.locator(".widget-label", has_text=re.compile(
        rf"^\s*{re.escape(label)}\s*$")))


@pytest.mark.parametrize("name", WIDGET_LESSONS)
def test_lesson_runs_in_jupyterlab_with_its_widgets(name, lab, browser, shots):
    page, page_errors = _open(browser, lab, name)
    stem = Path(name).stem
    try:
        cells = _run_all(page, name)
        _check_every_cell_ran_without_error(name, cells)
        interacts = _check_widgets_drawn(page, name, cells)
        for k, (index, cell) in enumerate(interacts):
            _shoot(cell, shots / f"{stem}-interact{k + 1}.png")
        if stem == "01_forward_process":
            _move_t_and_check_the_figure_redraws(page, interacts, shots)
        page.screenshot(path=str(shots / f"{stem}-end.png"))
        assert not [e for e in page_errors if "widget" in e.lower()], page_errors
    except Exception:
        page.screenshot(path=str(shots / f"{stem}-failed.png"))
        raise
    finally:
        page.close()


def _move_t_and_check_the_figure_redraws(page, interacts, shots):
    """Drag lesson 01's t slider to the right with the mouse, as a learner does, and check that the value
    changed and the figure was drawn again."""
    with_t = [(i, c) for i, c in interacts if _slider(c, "t").count() == 1]
    assert with_t, "lesson 01 has no interact cell with a slider labelled t"
    _, cell = with_t[0]
    slider = _slider(cell, "t")
    readout = slider.locator(".widget-readout")
    figure = cell.locator(".widget-output img").first
    before, value_before = figure.get_attribute("src"), readout.inner_text().strip()
    _shoot(cell, shots / f"01_forward_process-t{value_before}.png")
    handle = slider.locator(".noUi-handle, [role=slider]").first
    box = handle.bounding_box()
    track = slider.locator(".slider-container, .noUi-target").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 0.4 * track["width"], y, steps=12)
    page.mouse.up()
    page.wait_for_function("([node, old]) => !node.isConnected || node.getAttribute('src') !== old",
                           arg=[figure.element_handle(), before], timeout=60_000, polling=250)
    page.wait_for_function(KERNEL_IDLE, timeout=60_000, polling=500)
    figure = cell.locator(".widget-output img").first
    figure.wait_for(state="visible", timeout=60_000)
    after, value_after = figure.get_attribute("src"), readout.inner_text().strip()
    assert int(value_after) > int(value_before), f"dragging the t slider right left t at {value_after}"
    assert after and after != before, "moving t did not redraw the figure"
    _shoot(cell, shots / f"01_forward_process-t{value_after}.png")


def test_the_checks_catch_a_cell_that_raises(lab, browser):
    """Not vacuous: in a notebook whose second cell raises, run-all stops there, and the check says so."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0"),
                nbformat.v4.new_code_cell("y = 2")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(lab["root"] / "raises.ipynb"))
    page, _ = _open(browser, lab, "raises.ipynb")
    try:
        cells = _run_all(page, "raises.ipynb")
        with pytest.raises(AssertionError, match="did not run"):
            _check_every_cell_ran_without_error("raises.ipynb", cells)
        assert any(o["output_type"] == "error" for o in cells[1]["outputs"])
    finally:
        page.close()
