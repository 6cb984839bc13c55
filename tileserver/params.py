"""Query parameters of tile requests -> ViewParams. The rules live in compositor.params (the
command line validates with them too); a bad parameter is a 422 that names it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from compositor.params import TileQuery


class ViewQuery:
    """titiler's reader dependency: the validated query becomes the reader's ``params``."""

    def __init__(self, query: Annotated[TileQuery, Query()]) -> None:
        self.query = query
        self.view = query.view()

    def as_dict(self, exclude_none: bool = True) -> dict:
        return {"params": self.view}
