"""deploy/: compose file, Dockerfile, systemd units and the example config are consistent with
the code (`docker compose config` is used too when Docker with the compose plugin is here)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from libs.common.config import SECRET_KEYS, load_config, redacted

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _procfile() -> dict[str, str]:
    out = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if ":" in line and not line.startswith("#"):
            name, cmd = line.split(":", 1)
            out[name.strip()] = cmd.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_every_compose_service_restarts_unless_stopped_and_has_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert services
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"


def test_compose_runs_one_service_per_procfile_process_checked_by_neopulse_status(
    compose: dict[str, Any]
) -> None:
    services = compose["services"]

    for proc, cmd in _procfile().items():
        svc = services[proc]
        assert " ".join(svc["command"]) == cmd, proc
        assert svc["healthcheck"]["test"][:3] == ["CMD", "neopulse", "status"], proc
        assert svc["healthcheck"]["test"][-1] == proc
        assert svc["env_file"] == [".env"], f"{proc}: secrets come from the env file"
        assert svc["image"] == "neopulse:latest"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_has_postgres_16_with_a_volume_and_execution_waits_for_it(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]

    assert pg["image"] == "postgres:16"
    volume = pg["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data" and volume[0] in compose["volumes"]
    assert compose["services"]["execution"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_compose_keeps_the_bus_off_the_network_and_secrets_out_of_the_file(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yaml").read_text()

    for name, svc in compose["services"].items():
        assert "ports" not in svc, f"{name} publishes a port"
        if name != "netns":
            assert svc.get("network_mode") == "service:netns", name
        env = svc.get("environment", {})
        for key, value in env.items():
            if any(s in key for s in ("TOKEN", "MPIN", "TOTP", "CONSUMER_KEY", "PASSWORD")):
                assert str(value).startswith("${"), f"{name}: {key} must come from .env"
    assert "NEOPULSE_BUS__HOST" not in text  # loopback default stands


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_validates_when_available(tmp_path: Path) -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    env_file = DEPLOY / ".env"
    created = not env_file.exists()
    if created:
        shutil.copy(DEPLOY / ".env.example", env_file)
    try:
        res = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                             capture_output=True, text=True, check=False)
    finally:
        if created:
            env_file.unlink()
    assert res.returncode == 0, res.stderr


def test_dockerfile_builds_the_same_package_as_non_root_without_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]

    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert "pip install ." in text
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert lines.index(next(ln for ln in lines if ln.startswith("USER "))) > lines.index(
        next(ln for ln in lines if ln.startswith("COPY --from")))
    copied = {tok for ln in copies if "--from" not in ln for tok in ln.split()[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "libs", "services"}
    assert not re.search(r"(?i)(token|mpin|totp|secret|password)\s*=", " ".join(
        ln for ln in lines if ln.startswith(("ENV", "ARG"))))
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "**/.env" in ignore
    # the package it installs is the one `make up` installs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "neopulse"
    assert re.search(r"pip install .*-e '\.\[dev\]'", (ROOT / "Makefile").read_text())


def test_systemd_units_run_each_process_with_secrets_from_an_env_file() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "neopulse@.service")
    target = (DEPLOY / "systemd" / "neopulse.target").read_text()

    svc = unit["Service"]
    assert svc["ExecStart"].endswith("python -m services.%i")
    assert svc["User"] == "neopulse"
    assert svc["EnvironmentFile"] == "/etc/neopulse/neopulse.env"
    assert svc["Restart"] == "always" and svc["RestartPreventExitStatus"] == "2"
    for proc in _procfile():
        assert f"neopulse@{proc}.service" in target


def test_example_config_loads_and_example_env_names_only_real_keys(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "neopulse.example.toml", env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})
    env = {k: v or "" for k, v in dotenv_values(DEPLOY / ".env.example").items()}
    env["NEOPULSE_ENV_FILE"] = str(tmp_path / "none.env")
    with_secrets = load_config(DEPLOY / "neopulse.example.toml", env=env)

    assert cfg.bus.host == "127.0.0.1" and not cfg.bus.curve
    assert [s.id for s in cfg.strategy] == ["mom1"]
    named = {k.removeprefix("NEOPULSE_").lower().replace("__", ".") for k in env if k.startswith("NEOPULSE_")}
    assert {f"{s}.{k}" for s, k in SECRET_KEYS if k != "feed_auth"} <= named
    assert redacted(with_secrets)  # loads with every variable present
    example = (DEPLOY / "neopulse.example.toml").read_text()
    for _, key in SECRET_KEYS:
        assert not re.search(rf"^\s*{key}\s*=", example, re.M), f"secret {key} in the example config"
