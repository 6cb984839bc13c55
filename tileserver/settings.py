"""Server settings, from CLEARSKY_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLEARSKY_")

    data_dir: Path = Path("data/demo")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    tile_cache_mb: int = Field(192, ge=0)
    mask_cache_mb: int = Field(128, ge=0)  # cloud/shadow masks of recent windows
    # Memory the renders in flight hold together (estimated per render from its scenes and
    # window): a render past it waits; one larger than all of it (a 512 px tile over 100+
    # scenes) runs alone.
    render_mb: int = Field(288, ge=16)
    render_threads: int = Field(2, ge=1, le=64)  # tiles rendered at once (each uses all cores)
    render_queue: int = Field(32, ge=0, le=10000)  # tiles waiting for a render thread; 503 past
    # Render threads' nice increment: > 0 lets the event loop (/health, cached tiles) preempt
    # them on a busy host, at the cost of render throughput where other processes compete.
    render_nice: int = Field(0, ge=0, le=19)
    http_threads: int = Field(8, ge=1, le=256)  # sync routes and dependencies (not renders)
    idle_timeout_s: float = Field(5.0, gt=0)  # keep-alive connections idle this long are closed
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this
    cors_origins: str = "*"  # comma separated; tiles are meant to be embedded anywhere
    static_dir: Path = Path(__file__).resolve().parent.parent / "static"


@lru_cache
def get_settings() -> Settings:
    return Settings()
