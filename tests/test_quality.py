"""The point of the product, measured: on the persistent-cloud synthetic cell the SCL-masked
composite has far less residual cloud than the plain 25th percentile (against the truth)."""

from compositor.demo import SYNTH_CELL, read_truth
from compositor.quality import composite_scores
from compositor.stack import Stack
from compositor.tiling import ViewParams, composite_window


def test_masked_composite_beats_vanilla_percentile(demo_dir):
    path = demo_dir / f"{SYNTH_CELL}.zarr"
    stack = Stack.open(path)
    truth = read_truth(path)["composite"]
    window = (0, 0, stack.height, stack.width)
    scores = {}
    for mask in ("none", "scl"):
        res = composite_window(stack, 0, window, ViewParams(mask=mask))
        scores[mask] = composite_scores(res.values, truth, stack.bands)
    vanilla, masked = scores["none"], scores["scl"]
    assert vanilla["residual_cloud"] > 0.2  # the tropics case: a plain percentile fails
    assert masked["residual_cloud"] < 0.25 * vanilla["residual_cloud"]
    assert masked["residual_total"] < 0.5 * vanilla["residual_total"]
    assert masked["rmse"]["B02"] < 0.5 * vanilla["rmse"]["B02"]
