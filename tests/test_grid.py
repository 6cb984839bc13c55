import pytest

from compositor.grid import CellError, cell, cell_at, cells_in_bbox, normalize_cell_id


def test_real_item_origin_matches_sentinel2_grid():
    # The real 29RKH Earth Search item has its origin at (199980, 2800020), EPSG:32629.
    c = cell("29RKH")
    assert c.epsg == 32629
    assert c.bounds == (199980.0, 2800020.0 - 109800.0, 199980.0 + 109800.0, 2800020.0)


def test_romania_point_is_in_34TER():
    assert cell_at(22.15, 45.20) == "34TER"
    w, s, e, n = cell("34TER").lonlat_bounds()
    assert w < 22.15 < e and s < 45.20 < n


@pytest.mark.parametrize("raw", ["T54SUE", "54sue", " 54SUE "])
def test_normalize(raw):
    assert normalize_cell_id(raw) == "54SUE"


@pytest.mark.parametrize("bad", ["", "54", "99ZZZ", "54SUI", "../etc/passwd", "54SUE.zarr"])
def test_bad_ids_name_the_problem(bad):
    with pytest.raises(CellError, match="invalid Sentinel-2 cell id"):
        cell(bad)


def test_cells_in_bbox_spans_zone_boundary():
    cells = cells_in_bbox((17.9, 45.0, 18.1, 45.1))
    assert any(c.startswith("33") for c in cells) and any(c.startswith("34") for c in cells)
