"""Query parameters of tile requests -> ViewParams, with 422s that name the bad parameter.

Every 422 has FastAPI's validation-error shape (``detail``: a list of ``{loc, msg, type}``), as
the OpenAPI document says, whether the check is a declared bound or one made here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from titiler.core.dependencies import DefaultDependency

from compositor.render import DEFAULT_GAMMA, DEFAULT_RESCALE
from compositor.tiling import ViewParams

# Limits on what one request may ask for (README, "Limits").
MIN_TILESIZE, MAX_TILESIZE = 64, 512  # a 512 px tile of 100 scenes reads ~160 MB of looks
MAX_QUERY_BYTES = 2048


def invalid(loc: tuple[str, ...], msg: str, value: object = None) -> RequestValidationError:
    """A 422 naming the parameter at ``loc`` (e.g. ("query", "months")), in FastAPI's shape."""
    return RequestValidationError(
        [{"type": "value_error", "loc": loc, "msg": f"{loc[-1]}: {msg}", "input": value}]
    )


def _bad(param: str, msg: str) -> RequestValidationError:
    return invalid(("query", param), msg)


def single_values(request: Request) -> None:
    """A parameter given twice is ambiguous (which one is the tile?): 422 naming it."""
    keys = [k for k, _ in request.query_params.multi_items()]
    if len(keys) != len(set(keys)):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise invalid(("query", twice[0]), "given more than once; give it once")


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
    mask: Annotated[Literal["scl", "segformer", "none"], Query(description="Cloud/shadow mask")] = (
        "scl"
    )
    cloud_threshold: Annotated[float, Query(gt=0, lt=1, description="Model probability")] = 0.4
    dilate: Annotated[int, Query(ge=0, le=50, description="Mask dilation, 10 m pixels")] = 3
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
            min_clear=self.min_clear,
            rescale=parse_rescale(self.rescale),
            gamma=self.gamma,
            date=self.date,
            hillshade=self.hillshade,
        )

    def as_dict(self, exclude_none: bool = True) -> dict:
        return {"params": self.view}
