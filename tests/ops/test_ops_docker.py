"""docker/: the compose file and Dockerfiles hang together (no Docker engine here, so no image is built).

``docker compose config`` (or the standalone ``docker-compose config``) validates the compose file against
the Compose schema when either is installed; the parser tests always run and check what the schema cannot:
build contexts, Dockerfiles and bind-mounted ops/ files exist, Redis has AOF on, workers reserve a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from worker.cli.main import app

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
_OTHER_AREAS = {"review": "review page", "train-worker": "training"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def cli_commands() -> set[str]:
    import typer.main

    group = typer.main.get_command(app)
    return set(getattr(group, "commands", {}))


def test_ops_compose_services_builds_and_mounts_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert {"redis", "worker", "review", "trainer", "prometheus", "grafana"} <= set(services)
    declared_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == REPO, name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"


def test_ops_compose_redis_durable_and_workers_on_gpus() -> None:
    services = compose()["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    for gpu_service in ("worker", "trainer"):
        devices = services[gpu_service]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    worker = services["worker"]
    assert worker["environment"]["MODERATION_METRICS_PORT"] == "9100"
    assert worker["environment"]["REDIS_URL"].startswith("redis://redis:")
    # Prometheus finds every worker replica by the service's DNS name, on the metrics port.
    prom = yaml.safe_load((REPO / "ops" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "moderation-worker")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == 9100
    # Grafana gets the provisioning files and the dashboard the provider points at.
    grafana_mounts = dict(m.split(":")[:2] for m in services["grafana"]["volumes"])
    assert grafana_mounts["../ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (REPO / "ops" / "grafana" / "provisioning" / "dashboards" / "moderation.yml").read_text()
    )
    assert grafana_mounts["../ops/grafana"] == provider["providers"][0]["options"]["path"]


def test_ops_dockerfiles_copy_real_paths_and_run_real_commands() -> None:
    commands = cli_commands()
    assert "worker" in commands and "dlq" in commands
    for dockerfile in sorted(DOCKER.glob("*.Dockerfile")):
        text = dockerfile.read_text()
        for src in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", text, re.M):
            for path in src.split():
                assert (REPO / path).exists(), f"{dockerfile.name}: COPY {path} missing"
        assert "USER moderation" in text, f"{dockerfile.name} runs as root"
        assert 'ENTRYPOINT ["tini", "--", "moderation"]' in text
    worker_df = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+runtime", worker_df, re.M)
    cmd = re.search(r'^CMD \["(\S+?)"', worker_df, re.M)
    assert cmd is not None and cmd.group(1) in commands
    # The review page and the trainer commands belong to other areas and may land after this one.
    for name, svc in compose()["services"].items():
        if "build" in svc:
            first = svc["command"][0]
            assert first in commands or first in _OTHER_AREAS, f"{name}: no `moderation {first}` command"


def test_ops_compose_config_validates_with_the_docker_client(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` installed (WITH_OPS_TOOLS=1 scripts/setup)"
        )
    env = dict(os.environ, GRAFANA_ADMIN_PASSWORD="test-only")
    ok = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # and it does reject a broken file (so the check above means something)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace("    stop_grace_period: 120s\n", "    stop_grace_perod: 1\n")
    )
    bad = subprocess.run([*cli, "-f", str(broken), "config", "-q"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    # the Grafana admin password is required, never defaulted
    no_pw = {k: v for k, v in env.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    missing = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=no_pw
    )
    assert missing.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in missing.stdout + missing.stderr


def test_ops_compose_routes_alerts_to_alertmanager_and_scrapes_redis() -> None:
    services = compose()["services"]
    assert {"alertmanager", "redis-exporter"} <= set(services)
    prom = yaml.safe_load((REPO / "ops" / "prometheus" / "prometheus.yml").read_text())
    targets = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    am = services["alertmanager"]
    am_mounts = dict(m.split(":")[:2] for m in am["volumes"])
    assert am_mounts["../ops/alertmanager"] == "/etc/alertmanager"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]
    config = yaml.safe_load((REPO / "ops" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert all(r.get("webhook_configs") for r in receivers.values())  # the example receivers
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["redis"]["static_configs"][0]["targets"] == ["redis-exporter:9121"]
    assert services["redis-exporter"]["environment"]["REDIS_ADDR"] == "redis://redis:6379"
    assert "--maxmemory" in services["redis"]["command"]  # the memory alerts need a bound
    assert services["worker"]["environment"]["MODERATION_CELERY_EVENTS"] == "true"


def test_ops_compose_keeps_every_stateful_service_on_a_named_volume() -> None:
    doc = compose()
    services = doc["services"]
    state = {
        "redis": "/data",
        "review": "/home/moderation/.moderation",
        "prometheus": "/prometheus",
        "grafana": "/var/lib/grafana",
        "alertmanager": "/alertmanager",
        "trainer": "/data/training",
    }
    for name, path in state.items():
        named = {
            m.split(":")[1]: m.split(":")[0]
            for m in services[name]["volumes"]
            if not m.startswith((".", "/"))
        }
        assert path in named, f"{name}: {path} is not on a named volume"
        assert named[path] in doc["volumes"]
    review_df = (DOCKER / "review.Dockerfile").read_text()
    # the image creates the mount point as its user, so the fresh volume is writable by it
    assert "RUN mkdir -p /home/moderation/.moderation" in review_df.split("USER moderation", 1)[1]
    env_home = re.search(r"MODERATION_HOME=(\S+)", review_df)
    assert env_home is not None and env_home.group(1) == state["review"]


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed (prometheus-alertmanager)")
def test_ops_alertmanager_config_passes_amtool() -> None:
    proc = subprocess.run(
        ["amtool", "check-config", str(REPO / "ops" / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
