"""Deployment files stay valid: docker-compose.yml (Docker cannot run here, so it is parsed)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_redis_is_append_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"


def test_compose_worker_reserves_gpu_and_points_at_redis():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert worker["environment"]["CTXMEM_REDIS_URL"] == "redis://redis:6379/0"
    assert (ROOT / worker["build"] / "Dockerfile").is_file()
