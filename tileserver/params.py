"""Query parameters of tile requests -> ViewParams, with 422s that name the bad parameter."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import HTTPException, Query
from titiler.core.dependencies import DefaultDependency

from compositor.render import DEFAULT_GAMMA, DEFAULT_RESCALE
from compositor.tiling import ViewParams


def _bad(param: str, msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=f"invalid '{param}': {msg}")


def parse_months(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        months = tuple(sorted({int(m) for m in value.split(",") if m.strip()}))
    except ValueError:
        raise _bad("months", f"{value!r} is not a comma-separated list of months 1-12") from None
    if not months or any(m < 1 or m > 12 for m in months):
        raise _bad("months", f"{value!r}: months are 1-12")
    return months


def parse_rescale(value: str | None) -> tuple[float, float]:
    if not value:
        return DEFAULT_RESCALE
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise _bad("rescale", f"{value!r} is not 'min,max'") from None
    if not hi > lo:
        raise _bad("rescale", f"{value!r}: max must be greater than min")
    return (lo, hi)


@dataclass
class ViewQuery(DefaultDependency):
    """Composite and rendering options; all of them are part of the tile cache key."""

    layer: Annotated[
        Literal["composite", "count", "date", "cloud"],
        Query(description="composite | count (clear observations) | date | cloud"),
    ] = "composite"
    percentile: Annotated[float, Query(ge=0, le=100, description="Percentile over time")] = 25.0
    start: Annotated[dt.date | None, Query(description="First date (YYYY-MM-DD)")] = None
    end: Annotated[dt.date | None, Query(description="Last date (YYYY-MM-DD)")] = None
    months: Annotated[str | None, Query(description="Months of the year, e.g. 6,7,8,9")] = None
    mask: Annotated[
        Literal["auto", "scl", "segformer", "none"],
        Query(description="Cloud/shadow mask: auto = the model's where it ran, else SCL"),
    ] = "auto"
    cloud_threshold: Annotated[float, Query(gt=0, lt=1, description="Model probability")] = 0.4
    dilate: Annotated[
        int | None, Query(ge=0, le=50, description="Mask dilation, 10 m pixels (default: per mask)")
    ] = None
    temporal: Annotated[
        bool, Query(description="Multi-temporal test: drop looks far from the pixel's clear state")
    ] = True
    min_clear: Annotated[int, Query(ge=1, le=100, description="Clear looks before fallback")] = 1
    rescale: Annotated[str | None, Query(description="DN range 'min,max' for display")] = None
    gamma: Annotated[float, Query(gt=0, le=5, description="Display gamma")] = DEFAULT_GAMMA
    date: Annotated[dt.date | None, Query(description="Scene date for layer=date|cloud")] = None
    hillshade: Annotated[
        float, Query(ge=0, le=1, description="DEM hillshade blend strength (0 = off)")
    ] = 0.0

    def __post_init__(self) -> None:
        if self.start and self.end and self.start > self.end:
            raise _bad("start", f"{self.start} is after end {self.end}")
        if self.layer in ("date", "cloud") and self.date is None:
            raise _bad("date", f"layer={self.layer} needs date=YYYY-MM-DD")
        self.view = ViewParams(
            layer=self.layer,
            percentile=self.percentile,
            start=self.start,
            end=self.end,
            months=parse_months(self.months),
            mask=self.mask,
            cloud_threshold=self.cloud_threshold,
            dilate=self.dilate,
            temporal=self.temporal,
            min_clear=self.min_clear,
            rescale=parse_rescale(self.rescale),
            gamma=self.gamma,
            date=self.date,
            hillshade=self.hillshade,
        )

    def as_dict(self, exclude_none: bool = True) -> dict:
        return {"params": self.view}
