"""Tile query parameters -> ViewParams: the one validation of them, for the server (query
strings, 422) and the command line (`clearsky export`, one line and exit 2).

Both hand in text; pydantic coerces it the same way for both. Defaults and allowed values are
read from :class:`ViewParams` and the compositor's own tables, so they cannot drift apart."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compositor.composite import MASK_METHODS
from compositor.render import DEFAULT_RESCALE
from compositor.tiling import LAYERS, ViewParams

_D = ViewParams()


def parse_months(value: str | None) -> tuple[int, ...] | None:
    """'6,7,8,9' -> (6, 7, 8, 9); None or '' -> None (every month)."""
    if not value:
        return None
    try:
        months = tuple(sorted({int(m) for m in value.split(",") if m.strip()}))
    except ValueError:
        raise ValueError(f"{value!r} is not a comma-separated list of months 1-12") from None
    if not months or any(m < 1 or m > 12 for m in months):
        raise ValueError(f"{value!r}: months are 1-12")
    return months


def parse_rescale(value: str | None) -> tuple[float, float]:
    """'min,max' (DN) -> (min, max); None or '' -> the default stretch."""
    if not value:
        return DEFAULT_RESCALE
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"{value!r} is not 'min,max'") from None
    if not hi > lo:
        raise ValueError(f"{value!r}: max must be greater than min")
    return (lo, hi)


class TileQuery(BaseModel):
    """Composite and rendering options of a tile; all of them are part of the tile cache key."""

    model_config = ConfigDict(extra="ignore")

    layer: Literal[LAYERS] = Field(  # type: ignore[valid-type]
        _D.layer, description="composite | count (clear observations) | date | cloud"
    )
    percentile: float = Field(_D.percentile, ge=0, le=100, description="Percentile over time")
    start: dt.date | None = Field(None, description="First date (YYYY-MM-DD)")
    end: dt.date | None = Field(None, description="Last date (YYYY-MM-DD)")
    months: str | None = Field(None, description="Months of the year, e.g. 6,7,8,9")
    mask: Literal[MASK_METHODS] = Field(  # type: ignore[valid-type]
        _D.mask, description="Cloud/shadow mask: auto = the model's where it ran, else SCL"
    )
    cloud_threshold: float = Field(_D.cloud_threshold, gt=0, lt=1, description="Model probability")
    dilate: int | None = Field(
        _D.dilate, ge=0, le=50, description="Mask dilation, 10 m pixels (default: per mask)"
    )
    temporal: bool = Field(
        _D.temporal, description="Multi-temporal test: drop looks far from the pixel's clear state"
    )
    min_clear: int = Field(_D.min_clear, ge=1, le=100, description="Clear looks before fallback")
    rescale: str | None = Field(None, description="DN range 'min,max' for display")
    gamma: float = Field(_D.gamma, gt=0, le=5, description="Display gamma")
    date: dt.date | None = Field(None, description="Scene date for layer=date|cloud")
    hillshade: float = Field(
        _D.hillshade, ge=0, le=1, description="DEM hillshade blend strength (0 = off)"
    )

    @field_validator("months")
    @classmethod
    def _months(cls, v: str | None) -> str | None:
        parse_months(v)
        return v

    @field_validator("rescale")
    @classmethod
    def _rescale(cls, v: str | None) -> str | None:
        parse_rescale(v)
        return v

    @model_validator(mode="after")
    def _together(self) -> TileQuery:
        # Whole-query rules carry the parameter's name in the message (they have no location).
        if self.start and self.end and self.start > self.end:
            raise ValueError(f"invalid 'start': {self.start} is after end {self.end}")
        if self.layer in ("date", "cloud") and self.date is None:
            raise ValueError(f"invalid 'date': layer={self.layer} needs date=YYYY-MM-DD")
        return self

    def view(self) -> ViewParams:
        return ViewParams(
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

    def given(self) -> dict[str, str]:
        """The parameters set away from their defaults, as query-string text (for metadata and
        the URL a reader would ask a server for the same pixels)."""
        return {k: str(v) for k, v in self.model_dump(exclude_defaults=True).items()}


class ParamError(ValueError):
    """A tile parameter is invalid; the message names it."""


def view_params(raw: Mapping[str, str | None]) -> tuple[TileQuery, ViewParams]:
    """Validate text parameters (unset ones: None) -> (the query, its ViewParams).
    Raises ParamError with one line naming the first bad parameter."""
    try:
        q = TileQuery.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        raise ParamError(describe(exc)) from None
    return q, q.view()


def describe(exc: ValidationError) -> str:
    """One line for the first error: "invalid 'percentile': ... (got '101')"."""
    err = exc.errors(include_url=False)[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:
        return msg
    name = str(err["loc"][-1])
    return f"invalid {name!r}: {msg} (got {err['input']!r})"
