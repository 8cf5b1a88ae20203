"""The axial viewer driven through PlanState: slices, dose sources, threshold, difference map; one browser test.

Runs are written to the real run store with known dose arrays on the real case's CT grid, so what the viewer
holds can be compared with the arrays exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest

from vmat_core import imaging, paths
from vmat_core.store import RunStore, new_run_id

RX_GY = 60.0


def _write_run(case_id: str, dose: np.ndarray, minutes_ago: float = 0.0) -> str:
    created = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    run_id = new_run_id("axial-view-test", created)
    RunStore().write_run(
        run_id,
        config={"case_id": case_id, "prescription_gy": RX_GY},
        metadata={"case_id": case_id, "status": "optimal", "prescription_gy": RX_GY, "solver": "test",
                  "created_at": created},
        arrays={"dose_3d_gy": dose.astype(np.float32)},
    )
    return run_id


def _blob_dose(shape, centre_zyx, peak_gy: float, sigma_vox=(3.0, 25.0, 25.0)) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip((z, y, x), centre_zyx, sigma_vox))
    dose = (peak_gy * np.exp(-0.5 * r2)).astype(np.float32)
    dose[dose < 0.01] = 0.0  # exact zeros far away keep the compressed run small and quick to write
    return dose


@pytest.fixture(scope="module")
def real_case(portpy_dir) -> str:
    from vmat_core.phantom import CASE_ID

    return CASE_ID


@pytest.fixture(scope="module")
def real_runs(real_case) -> dict[str, str | np.ndarray]:
    """Two runs of the real case: A a blob at the PTV, B = 1.1 A + a smaller blob elsewhere."""
    _, geom = imaging.ct_volume(real_case)
    ptv = imaging.structure_masks(real_case, ["PTV"])["PTV"]
    centre = [float(np.mean(ix)) for ix in np.nonzero(ptv)]
    a = _blob_dose(geom.shape_zyx, centre, 66.0)
    b = 1.1 * a + _blob_dose(geom.shape_zyx, (centre[0], centre[1] + 40, centre[2] - 60), 20.0)
    return {"a": _write_run(real_case, a, 10), "b": _write_run(real_case, b, 5), "dose_a": a, "dose_b": b,
            "ptv_z": imaging.structure_centroid_slice(real_case, "PTV")}


@pytest.fixture()
def viewer(real_case, real_runs):
    from app.axial_view import AxialViewer
    from app.state import PlanState

    state = PlanState(case_id=real_case)
    v = AxialViewer(state=state)
    v.__panel__()
    return v


def _dose_of(v) -> np.ndarray:
    return np.asarray(v.current_images()["dose"])


def test_slice_change_changes_the_image(viewer, real_case, real_runs):
    s = viewer.state
    s.param.update(displayed_run_id=real_runs["a"], show_reference=False)
    hu, _ = imaging.ct_volume(real_case)
    z = real_runs["ptv_z"]
    s.slice_index = z
    np.testing.assert_array_equal(viewer.current_images()["hu"], hu[z])
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_a"][z])
    ptv_lines = [x for x, n in zip(viewer._contour_source.data["xs"], viewer._contour_source.data["name"])
                 if n == "PTV"]
    assert ptv_lines  # the PTV is outlined on its centre slice
    assert viewer._iso_source.data["xs"]  # and the blob has isodose lines there
    s.slice_index = z + 4
    np.testing.assert_array_equal(viewer.current_images()["hu"], hu[z + 4])
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_a"][z + 4])
    assert viewer.figure.title.text.startswith(f"Slice {z + 4} of 0–")
    viewer.step_slice(-1)
    assert s.slice_index == z + 3
    viewer.step_slice(-10_000)
    assert s.slice_index == 0  # clamped


def test_switching_run_clears_the_dose_before_loading(viewer, real_runs, monkeypatch):
    import app.axial_view as av

    s = viewer.state
    s.param.update(displayed_run_id=real_runs["a"], show_reference=False, slice_index=real_runs["ptv_z"])
    assert np.nanmax(_dose_of(viewer)) > 10
    seen = []
    real_load = av.load_dose

    def spy(key):
        # what the browser holds at the moment the new dose starts loading
        seen.append((np.array(_dose_of(viewer)), list(viewer._iso_source.data["xs"]), viewer._iso_r.visible,
                     viewer.dose_loading, viewer.status))
        return real_load(key)

    monkeypatch.setattr(av, "load_dose", spy)
    s.displayed_run_id = real_runs["b"]
    (dose_then, _iso_then, iso_visible, loading, status) = seen[0]
    assert np.isnan(dose_then).all()
    assert not iso_visible
    assert loading and status.startswith("Loading")
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_b"][real_runs["ptv_z"]])
    assert not viewer.dose_loading and real_runs["b"][:8] in viewer.status or "Run" in viewer.status

    s.displayed_run_id = None  # no run: an empty dose layer, not the last one
    assert np.isnan(_dose_of(viewer)).all()
    assert "No dose" in viewer.status


def test_threshold_hides_low_dose_and_opacity_applies(viewer, real_runs):
    s = viewer.state
    s.param.update(displayed_run_id=real_runs["a"], dose_threshold_pct=30.0, dose_opacity=0.4)
    mapper = viewer._dose_r.glyph.color_mapper
    assert mapper.low == pytest.approx(0.3 * RX_GY)
    assert mapper.low_color == "rgba(0, 0, 0, 0)" and mapper.nan_color == "rgba(0, 0, 0, 0)"
    assert mapper.high == pytest.approx(float(real_runs["dose_a"].max()))
    assert viewer._dose_r.glyph.global_alpha == pytest.approx(0.4)
    s.dose_threshold_pct = 80.0
    assert viewer._dose_r.glyph.color_mapper.low == pytest.approx(0.8 * RX_GY)
    s.show_dose = False
    assert not viewer._dose_r.visible and not viewer._iso_r.visible
    s.show_dose = True
    assert viewer._dose_r.visible
    s.param.update(ct_window=350, ct_level=50)
    assert (viewer._ct_mapper.low, viewer._ct_mapper.high) == (-125, 225)


def test_difference_map_is_b_minus_a(viewer, real_runs):
    s = viewer.state
    z = real_runs["ptv_z"]
    s.param.update(displayed_run_id=real_runs["a"], compare_a=real_runs["a"], compare_b=real_runs["b"],
                   slice_index=z, dose_threshold_pct=10.0)
    viewer.show_difference = True
    a, b = real_runs["dose_a"][z], real_runs["dose_b"][z]
    expected = b - a
    expected[np.maximum(a, b) < 0.1 * RX_GY] = np.nan
    np.testing.assert_allclose(_dose_of(viewer), expected, atol=1e-5)
    assert np.nanmax(_dose_of(viewer)) > 5  # B is hotter where the extra blob is
    assert viewer._diff_r.visible and not viewer._dose_r.visible
    mapper = viewer._diff_r.glyph.color_mapper
    assert mapper.low == pytest.approx(-mapper.high)  # centred at 0
    hottest, coldest = mapper.palette[-1], mapper.palette[0]
    assert int(hottest[1:3], 16) > int(hottest[5:7], 16)  # B > A is red
    assert int(coldest[5:7], 16) > int(coldest[1:3], 16)  # B < A is blue
    assert not viewer._iso_r.visible
    assert "Difference B − A" in viewer.status
    assert "Δ dose" in viewer._hover.tooltips[-1][0]
    s.compare_b = None  # incomplete comparison: back to the displayed run
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_a"][z])


def test_reference_dose_is_loaded_without_running_anything(viewer, real_case):
    s = viewer.state
    assert s.case.has_reference_dose
    # The Load button (state.load_reference) evaluates the reference plan in the background and then sets
    # show_reference; the viewer needs only show_reference.
    s.param.update(displayed_run_id=None, show_reference=True)
    ref = imaging.reference_dose(real_case)
    np.testing.assert_array_equal(_dose_of(viewer), ref[s.slice_index])
    assert "Reference" in viewer.status


def test_isodose_levels_in_gy_and_errors(viewer, real_runs):
    from app.axial_view import AxialViewer

    s = viewer.state
    s.displayed_run_id = real_runs["a"]
    viewer.isodose_unit = "Gy"
    viewer.isodose_text = "30, 57"
    assert s.isodose_levels_pct == [50.0, 95.0]
    assert viewer.isodose_error == ""
    viewer.isodose_text = "30, lots"
    assert "isodose levels: 'lots' is not a number" in viewer.isodose_error
    assert s.isodose_levels_pct == [50.0, 95.0]
    with pytest.raises(ValueError, match="outside 1–200 % of Rx"):
        AxialViewer.parse_isodose_levels("250", "% Rx", RX_GY)
    names = set(viewer._iso_source.data["name"])
    assert names <= {"50%", "95%"} and names


# ---------------------------------------------------------------------------------------- switching cases


def _copy_case_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in ("CT_MetaData.json", "CT_Data.h5", "StructureSet_MetaData.json", "StructureSet_Data.h5",
              "OptimizationVoxels_MetaData.json"):
        try:
            os.link(src / f, dst / f)
        except OSError:
            shutil.copy2(src / f, dst / f)


def test_switching_case_clears_the_dose_at_once(real_case, real_runs, portpy_dir, tmp_path, monkeypatch):
    """Two cases (the real one and a copy with its CT inverted) each with a run; switching shows the new CT
    and never the other case's dose."""
    import app.axial_view as av
    from app.state import PlanState

    root = tmp_path / "data"
    _copy_case_files(portpy_dir / real_case, root / "portpy" / real_case)
    other = "Lung_Copy_Patient_2"
    _copy_case_files(portpy_dir / real_case, root / "portpy" / other)
    ct_file = root / "portpy" / other / "CT_Data.h5"
    with h5py.File(portpy_dir / real_case / "CT_Data.h5") as f:
        inverted = (-f["ct_hu_3d"][()]).astype(np.int16)
    ct_file.unlink()
    with h5py.File(ct_file, "w") as f:
        f["ct_hu_3d"] = inverted
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(root))
    imaging.clear_caches()
    run_real = _write_run(real_case, real_runs["dose_a"], 3)
    run_other = _write_run(other, real_runs["dose_b"], 1)

    state = PlanState(case_id=real_case)
    viewer = av.AxialViewer(state=state)
    assert state.displayed_run_id == run_real
    z = state.slice_index
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_a"][z])

    seen = []
    real_load = av.load_dose
    monkeypatch.setattr(av, "load_dose", lambda key: seen.append(
        (key, np.array(_dose_of(viewer)), np.array(viewer.current_images()["hu"]))) or real_load(key))
    state.case_id = other
    assert state.displayed_run_id == run_other
    key, dose_then, hu_then = seen[0]
    assert key.case_id == other
    assert np.isnan(dose_then).all()  # the old case's dose was gone before the new one loaded
    np.testing.assert_array_equal(hu_then, inverted[state.slice_index])  # and the new CT was already there
    np.testing.assert_array_equal(_dose_of(viewer), real_runs["dose_b"][state.slice_index])
    imaging.clear_caches()


def test_run_of_another_case_is_refused(real_case, real_runs, monkeypatch):
    from app.axial_view import AxialViewer
    from app.state import PlanState

    foreign = _write_run("Some_Other_Patient", real_runs["dose_b"], 2)
    state = PlanState(case_id=real_case)
    viewer = AxialViewer(state=state)
    state.displayed_run_id = foreign
    assert np.isnan(_dose_of(viewer)).all()
    assert "belongs to case Some_Other_Patient" in viewer.status


# --------------------------------------------------------------------------------------------- in a browser


ARTIFACTS = Path(__file__).parent / "artifacts"


def _canvas_png(page) -> bytes:
    return page.locator("canvas").first.screenshot()


def _coloured_fraction(png: bytes) -> float:
    """Share of clearly coloured (not grey) pixels left of the colour bar: the dose wash and coloured lines,
    never the CT."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    rgb = rgb[:, : int(rgb.shape[1] * 0.85)]
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def _hue_fraction(png: bytes, hue: str) -> float:
    """Share of pixels (left of the colour bar) where red, or blue, clearly dominates."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    rgb = rgb[:, : int(rgb.shape[1] * 0.85)]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hit = (r > b + 40) & (r > g + 25) if hue == "red" else (b > r + 40) & (b > g + 10)
    return float(hit.mean())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the system Chromium")
def test_viewer_in_browser_slider_moves_the_slice(page, real_case, real_runs):
    import panel as pn
    from panel.tests.util import serve_component

    from app.axial_view import AxialViewer
    from app.state import PlanState

    held = {}

    def app():
        state = PlanState(case_id=real_case)
        state.param.update(displayed_run_id=real_runs["a"], slice_index=real_runs["ptv_z"])
        held["viewer"], held["doc"], held["runs"] = AxialViewer(state=state), pn.state.curdoc, real_runs
        return pn.Column(held["viewer"], width=760)

    server_id = uuid.uuid4().hex
    serve_component(page, app, server_id=server_id)
    try:
        _drive_viewer(page, held)
    finally:  # stop this test's server thread only (other tests may still be serving)
        thread = pn.state._threads.pop(server_id, None)
        if thread is not None:
            thread.stop()
        pn.state._servers.pop(server_id, None)


def _drive_viewer(page, held) -> None:
    from panel.io.state import set_curdoc
    from panel.tests.util import wait_until
    from playwright.sync_api import expect

    def in_session(change):
        """Apply ``change(viewer)`` as a browser event would be: on the server's loop, holding the document."""
        def apply():
            with set_curdoc(held["doc"]):
                change(held["viewer"])
        held["doc"].add_next_tick_callback(apply)

    viewer = held["viewer"]
    z0 = viewer.state.slice_index
    slider_value = page.locator(".bk-slider-value").first
    expect(slider_value).to_have_text(str(z0), timeout=20_000)
    expect(page.get_by_text(re.compile(r"^Run .* · Rx 60 Gy · max"))).to_be_visible(timeout=20_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "axial_view.png"), full_page=True)
    before = _canvas_png(page)
    assert _coloured_fraction(before) > 0.01  # dose wash, isodose lines and contours are drawn

    # the slider, stepped with the keyboard on its handle
    handle = page.locator(".noUi-handle").first
    handle.focus()
    for _ in range(6):
        handle.press("ArrowRight")
    wait_until(lambda: viewer.state.slice_index == z0 + 6, page)
    expect(slider_value).to_have_text(str(z0 + 6))
    wait_until(lambda: _canvas_png(page) != before, page)

    # the mouse wheel over the image steps slices down
    box = page.locator("canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    wait_until(lambda: viewer.state.slice_index < z0 + 6, page)
    # and the ▶ button one up
    z1 = viewer.state.slice_index
    page.get_by_role("button", name="▶").click()
    wait_until(lambda: viewer.state.slice_index == z1 + 1, page)

    # threshold: above the plan's maximum nothing is coloured, at 10 % of Rx the wash is back
    in_session(lambda v: (v.param.update(show_isodose=False),
                          v.state.param.update(slice_index=z0, show_contours=False, dose_threshold_pct=150.0)))
    try:
        wait_until(lambda: _coloured_fraction(_canvas_png(page)) < 0.002, page)
    finally:
        (ARTIFACTS / "axial_view_no_wash.png").write_bytes(_canvas_png(page))
    in_session(lambda v: v.state.param.update(dose_threshold_pct=10.0))
    wait_until(lambda: _coloured_fraction(_canvas_png(page)) > 0.01, page)

    # the difference map B − A (B is hotter): red wash, no blue
    in_session(lambda v: (v.state.param.update(compare_a=held["runs"]["a"], compare_b=held["runs"]["b"]),
                          v.param.update(show_difference=True)))
    wait_until(lambda: _hue_fraction(_canvas_png(page), "red") > 0.01, page)
    assert _hue_fraction(_canvas_png(page), "blue") < 0.001
    in_session(lambda v: (v.param.update(show_isodose=True), v.state.param.update(show_contours=True)))
    expect(slider_value).to_have_text(str(z0))
    page.screenshot(path=str(ARTIFACTS / "axial_view_difference.png"), full_page=True)
