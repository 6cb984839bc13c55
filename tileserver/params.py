"""Query parameters of tile requests -> ViewParams. The rules live in compositor.params (the
command line validates with them too).

Every 422 has FastAPI's validation-error shape (``detail``: a list of ``{loc, msg, type}``), as
the OpenAPI document says, whether the check is a declared bound or one made here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError

from compositor.params import TileQuery

MIN_TILESIZE, MAX_TILESIZE = 64, 512  # a 512 px tile of 100 scenes reads ~160 MB of looks
MAX_QUERY_BYTES = 2048


def invalid(loc: tuple[str, ...], msg: str, value: object = None) -> RequestValidationError:
    """A 422 naming the parameter at ``loc`` (e.g. ("query", "months")), in FastAPI's shape."""
    return RequestValidationError(
        [{"type": "value_error", "loc": loc, "msg": f"{loc[-1]}: {msg}", "input": value}]
    )


def single_values(request: Request) -> None:
    """A parameter given twice is ambiguous (which one is the tile?): 422 naming it."""
    keys = [k for k, _ in request.query_params.multi_items()]
    if len(keys) != len(set(keys)):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise invalid(("query", twice[0]), "given more than once; give it once")


class ViewQuery:
    """titiler's reader dependency: the validated query becomes the reader's ``params``."""

    def __init__(self, query: Annotated[TileQuery, Query()]) -> None:
        self.query = query
        self.view = query.view()

    def as_dict(self, exclude_none: bool = True) -> dict:
        return {"params": self.view}
