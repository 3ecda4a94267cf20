"""The locked-down bus: CURVE keys and allow-list with real risk and execution processes,
and loopback-only binding when CURVE is off."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Bus, RequestTimeout
from libs.common.config import load_config
from libs.common.messages import GetStatus, Reply
from libs.common.security import install_curve
from tests.helpers import eventually, free_base_port, stack_env

ROOT = Path(__file__).resolve().parents[2]
NEOPULSE = str(Path(sys.executable).parent / "neopulse")


def _cli(env: dict[str, str], *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NEOPULSE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def _start(env: dict[str, str], name: str, home: Path) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / f"{name}.out").open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_keys_generate_writes_private_keypairs_and_an_allow_list(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home", free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"))
    keys = tmp_path / "home" / "keys"

    first = _cli(env, "keys", "generate", "--json")
    again = _cli(env, "keys", "generate", "--json")
    forced = _cli(env, "keys", "generate", "risk", "--force", "--json")

    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)["keys"]
    assert {k["name"] for k in made} == {"feed", "risk", "execution", "notifier", "strategy-mom1", "admin"}
    assert all(k["created"] for k in made)
    assert not any(k["created"] for k in json.loads(again.stdout)["keys"])
    risk_before = next(k for k in made if k["name"] == "risk")
    assert json.loads(forced.stdout)["keys"] == [{**risk_before, "created": True}]
    for k in made:
        assert stat.S_IMODE(Path(k["secret"]).stat().st_mode) == 0o600
        assert (keys / "allowed" / f"{k['name']}.key").read_text() == Path(k["public"]).read_text()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert "secret-key" not in (keys / "allowed" / "admin.key").read_text()


@pytest.fixture
def curve_stack(tmp_path: Path, pg_url: str) -> Iterator[dict[str, Any]]:
    home = tmp_path / "home"
    env = stack_env(home, free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
                    NEOPULSE_BUS__CURVE="true", NEOPULSE_DATABASE__URL=pg_url)
    assert _cli(env, "keys", "generate").returncode == 0
    # An intruder: its own keys (not on our allow-list) and our servers' public keys.
    rogue_keys = tmp_path / "rogue-keys"
    rogue = {**env, "NEOPULSE_BUS__KEYS_DIR": str(rogue_keys), "NEOPULSE_BUS__REQUEST_TIMEOUT_MS": "700"}
    assert _cli(rogue, "keys", "generate", "admin").returncode == 0
    for server in ("feed", "risk", "execution", "notifier"):
        shutil.copy(home / "keys" / f"{server}.key", rogue_keys / f"{server}.key")
    procs = [_start(env, "execution", home), _start(env, "risk", home)]
    try:
        cfg = load_config(env=env)
        bus = Bus(cfg)
        install_curve(bus, cfg, "admin")

        def answers() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError((home / "execution.out").read_text()[-2000:]
                                       + (home / "risk.out").read_text()[-2000:])
            try:
                reply = bus.client(cfg.bus.endpoint("risk_rep"), 500).request(GetStatus())
            except RequestTimeout:
                return False
            return isinstance(reply, Reply) and reply.ok
        eventually(answers, 40, 0.2, message="risk and execution up with CURVE")
        bus.close()
        yield {"env": env, "rogue": rogue, "home": home}
    finally:
        _stop(*procs)


def test_curve_refuses_clients_off_the_allow_list_and_lets_allowed_ones_through(
    curve_stack: dict[str, Any]
) -> None:
    env, rogue, home = curve_stack["env"], curve_stack["rogue"], curve_stack["home"]
    plain = {**rogue, "NEOPULSE_BUS__CURVE": "false"}

    # the intruder (unknown key) and a client without CURVE get nothing through
    attempts = {
        ("rogue", "trade"): (rogue, "trade", "BUY", "SBIN-EQ", "--qty", "1", "--price", "800"),
        ("rogue", "kill"): (rogue, "kill-switch", "on", "--reason", "intruder"),
        ("rogue", "flatten"): (rogue, "flatten", "--yes"),
        ("plain", "kill"): (plain, "kill-switch", "on", "--reason", "no-curve"),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        futures = {who: pool.submit(_cli, *args) for who, args in attempts.items()}
    for who, fut in futures.items():
        res = fut.result()
        assert res.returncode == 3, (who, res.stdout, res.stderr)
        assert "unreachable" in res.stderr

    # the operator's allowed key does
    status = _cli(env, "kill-switch", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout).get("kill_switch", False) is False  # the intruder did not trip it
    trade = _cli(env, "trade", "BUY", "SBIN-EQ", "--qty", "1", "--price", "800")
    assert trade.returncode in (0, 1) and ("APPROVED" in trade.stdout or "REJECTED" in trade.stdout), trade
    assert _cli(env, "kill-switch", "on", "--reason", "operator test").returncode == 0
    assert _cli(env, "kill-switch", "off").returncode == 0
    flat = _cli(env, "flatten", "--yes")
    assert flat.returncode in (0, 1) and "unreachable" not in flat.stderr, flat

    refused = [json.loads(ln) for svc in ("risk", "execution")
               for ln in (home / "log" / f"{svc}.log").read_text().splitlines()
               if "curve_client_refused" in ln]
    assert {r["service"] for r in refused} == {"risk", "execution"}
    rogue_key = (Path(rogue["NEOPULSE_BUS__KEYS_DIR"]) / "admin.key").read_text()
    assert all(r["client_key"] in rogue_key for r in refused)
    # the client without CURVE never reaches the allow-list; its failed handshake is logged too
    risk_log = (home / "log" / "risk.log").read_text()
    failed = [json.loads(ln) for ln in risk_log.splitlines() if "curve_handshake_failed" in ln]
    assert failed and failed[0]["service"] == "risk" and failed[0]["endpoint"].startswith("tcp://127.0.0.1:")


def test_with_curve_the_notifiers_key_flattens_and_trips_the_kill_switch_but_places_no_order(
    curve_stack: dict[str, Any]
) -> None:
    from libs.common.messages import BasketRequest, CancelEntries, Flatten, KillSwitch, RiskVerdict
    from tests.kit import execute_order, order_request

    cfg = load_config(env=curve_stack["env"])
    bus = Bus(cfg)
    install_curve(bus, cfg, "notifier")  # what the notifier process presents

    def ask(endpoint: str, msg: Any) -> Any:
        client = bus.client(cfg.bus.endpoint(endpoint), 10_000)
        try:
            return client.request(msg)
        finally:
            client.close()

    try:
        leg = order_request("SBIN-EQ", "BUY", 1, "800", strategy="tg", rid="leg")
        order = ask("risk_rep", order_request("SBIN-EQ", "BUY", 1, "800", strategy="tg", rid="tg-order-1"))
        basket = ask("risk_rep", BasketRequest(request_id="tg-basket-1", strategy_id="tg", legs=[leg, leg]))
        execute = ask("execution_rep", execute_order("SBIN-EQ", "BUY", 1, "800.00", strategy="tg",
                                                     rid="tg-exec-1"))
        cancel = ask("execution_rep", CancelEntries(request_id="tg-cancel-1"))
        flatten = ask("execution_rep", Flatten(request_id="tg-flatten-1", strategy_id="nobody",
                                               source="telegram"))
        halt = ask("risk_rep", KillSwitch(on=True, reason="telegram /halt", source="telegram",
                                          request_id="tg-ks-1"))
        resume = ask("risk_rep", KillSwitch(on=False, source="telegram", request_id="tg-ks-2"))
    finally:
        bus.close()

    for verdict in (order, basket):
        assert not verdict.approved and verdict.code == "unauthorised", verdict
        assert "no orders from the notifier's CURVE key" in verdict.reason
    assert isinstance(order, RiskVerdict)
    for reply, kind in ((execute, "ExecuteOrder"), (cancel, "CancelEntries")):
        assert isinstance(reply, Reply) and (reply.ok, reply.code) == (False, "unauthorised"), reply
        assert f"execution takes {kind} only from" in reply.error and "notifier's" in reply.error
    assert isinstance(flatten, Reply) and flatten.ok, flatten
    assert isinstance(halt, Reply) and halt.ok and halt.data.get("kill_switch") is True
    assert isinstance(resume, Reply) and resume.ok and not resume.data.get("kill_switch")


def test_curve_without_keys_is_a_config_error(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home", free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
                    NEOPULSE_BUS__CURVE="true")

    svc = subprocess.run([sys.executable, "-m", "services.notifier"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    cli = _cli(env, "kill-switch", "status")

    for res in (svc, cli):
        assert res.returncode == 2
        assert "neopulse keys generate" in res.stderr
        assert "Traceback" not in res.stderr


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = local.split(":")
            if v6:
                addr = "::1" if hexaddr == "0" * 24 + "01000000" else hexaddr
            else:
                addr = ".".join(str(int(hexaddr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out.append((addr, int(hexport, 16)))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_without_curve_services_listen_on_loopback_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = free_base_port()
    env = stack_env(home, base, NEOPULSE_ENV_FILE=str(tmp_path / "none.env"))
    procs = [_start(env, "feed", home), _start(env, "notifier", home)]
    try:
        expected = {base + 1, base + 2, base + 401}
        def all_listening() -> list[tuple[str, int]] | None:
            sockets = [x for p in procs for x in _listening(p.pid)]
            return sockets if {port for _, port in sockets} >= expected else None
        found = eventually(all_listening, 20, 0.2, message="the services listening")
    finally:
        _stop(*procs)

    assert {p for _, p in found} >= expected
    assert all(addr == "127.0.0.1" for addr, _ in found), found


def test_a_non_loopback_host_without_curve_is_refused(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home", free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
                    NEOPULSE_BUS__HOST="0.0.0.0")

    res = subprocess.run([sys.executable, "-m", "services.notifier"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30, check=False)

    assert res.returncode == 2
    assert res.stderr.strip() == (
        "config error: NEOPULSE_BUS__HOST: `bus.host` 0.0.0.0 is reachable from other machines; "
        "set bus.curve = true (and run `neopulse keys generate`) or use 127.0.0.1")
