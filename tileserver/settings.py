"""Server settings, from CLEARSKY_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLEARSKY_")

    data_dir: Path = Path("data/demo")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    tile_cache_mb: int = 256
    mask_cache_mb: int = 512  # cloud/shadow masks of recent windows (reused across percentiles)
    cors_origins: str = "*"  # comma separated; tiles are meant to be embedded anywhere
    static_dir: Path = Path(__file__).resolve().parent.parent / "static"


@lru_cache
def get_settings() -> Settings:
    return Settings()
