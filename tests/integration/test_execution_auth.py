"""Only risk may place orders at execution; only risk or the operator's CLI may flatten, cancel
entries or record the kill switch. Real execution processes, real sockets, real PostgreSQL:
without CURVE the sender proves itself with the per-stack secret, with CURVE by its key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from libs.common.bus import Bus, RequestTimeout
from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    CancelEntries,
    ExecuteOrder,
    Flatten,
    GetDayState,
    GetOrders,
    GetStatus,
    Message,
    RecordRiskEvent,
    Reply,
)
from libs.common.security import install_curve
from libs.common.stack_secret import StackSecretError, load_or_create_secret, read_secret, secret_path
from tests.helpers import eventually, free_base_port, stack_env
from tests.integration.conftest import cloned_db
from tests.integration.test_execution_service import NEOPULSE, ExecStack
from tests.kit import execute_order

ROOT = Path(__file__).resolve().parents[2]
MASTER = MasterData.load()
LEDGER_TABLES = ("order_ledger", "order_events", "fills", "brackets", "risk_events")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: Any) -> Iterator[ExecStack]:
    with cloned_db(pg_server, f"np_auth_{os.getpid()}") as url:
        s = ExecStack(tmp_path_factory.mktemp("exec-auth") / "home", url)
        try:
            s.start()
            yield s
        finally:
            s.close()


def _execute(request_id: str, strategy: str = "s1", symbol: str = "RELIANCE-EQ") -> ExecuteOrder:
    return execute_order(symbol, "BUY", 1, "1000.00", strategy=strategy, rid=request_id)


def _send(bus: Bus, endpoint: str, msg: Message, credential: bytes | None = None,
          timeout_ms: int = 5000) -> Message:
    """A client that is not risk: no stack credential, or the one given."""
    client = bus.client(endpoint, timeout_ms)
    if credential is not None:
        client.credential = lambda: credential
    try:
        return client.request(msg)
    finally:
        client.close()


def _ledger_rows_mentioning(db_url: str, text: str) -> dict[str, int]:
    found = {}
    with psycopg.connect(db_url) as conn:
        for table in LEDGER_TABLES:
            row = conn.execute(f"SELECT count(*) FROM {table} t WHERE t::text LIKE %s",
                               (f"%{text}%",)).fetchone()
            if row and row[0]:
                found[table] = row[0]
    return found


def _log_lines(home: Path, event: str) -> list[dict[str, Any]]:
    path = home / "log" / "execution.log"
    return [json.loads(ln) for ln in path.read_text().splitlines() if f'"{event}"' in ln]


def _assert_unauthorised(reply: Message, kind: str, why: str) -> None:
    assert isinstance(reply, Reply), reply
    assert (reply.ok, reply.code) == (False, "unauthorised"), reply
    assert f"execution takes {kind} only from" in reply.error and why in reply.error, reply.error
    assert "\n" not in reply.error


def test_execute_order_from_a_non_risk_client_is_refused(stack: ExecStack) -> None:
    endpoint = stack.cfg.bus.endpoint("execution_rep")
    db_url = stack.env["NEOPULSE_DATABASE__URL"]

    bare = _send(stack.bus, endpoint, _execute("intruder-1", strategy="intruder"))
    forged = _send(stack.bus, endpoint, _execute("intruder-2", strategy="intruder"), credential=b"0" * 64)
    burst = [_send(stack.bus, endpoint, _execute(f"intruder-b{i}", strategy="intruder")) for i in range(20)]

    _assert_unauthorised(bare, "ExecuteOrder", "carried no stack credential")
    _assert_unauthorised(forged, "ExecuteOrder", "does not match")
    assert str(secret_path(stack.home)) in bare.error  # type: ignore[union-attr]
    assert not [o for o in stack.orders() if o["strategy_id"] == "intruder"]
    assert _ledger_rows_mentioning(db_url, "intruder-") == {}
    warned = _log_lines(stack.home, "sender_refused")
    assert {(w["kind"], w["request_id"]) for w in warned} >= {("ExecuteOrder", "intruder-1"),
                                                               ("ExecuteOrder", "intruder-2")}
    assert all(w["level"] == "warning" and w["reason"] for w in warned)
    assert all(getattr(b, "code", "") == "unauthorised" for b in burst)
    assert len(warned) == 2  # rate limited: one line per kind and reason, not one per request
    # and risk's own orders (here: a client presenting the stack secret) still flow
    accepted = stack.ok(_execute("risk-1", strategy="s-auth"))
    assert accepted["status"] == "PENDING_BROKER"


def test_flatten_cancel_entries_and_risk_events_need_the_stack_secret(stack: ExecStack) -> None:
    endpoint = stack.cfg.bus.endpoint("execution_rep")
    db_url = stack.env["NEOPULSE_DATABASE__URL"]
    resting = stack.ok(_execute("resting-1", strategy="s-rest"))

    replies = {
        "RecordRiskEvent": _send(stack.bus, endpoint, RecordRiskEvent(
            event="kill_switch_on", reason="intruder", source="cli", request_id="intruder-ks")),
        "CancelEntries": _send(stack.bus, endpoint, CancelEntries(request_id="intruder-cancel")),
        "Flatten": _send(stack.bus, endpoint, Flatten(request_id="intruder-flatten")),
    }

    for kind, reply in replies.items():
        _assert_unauthorised(reply, kind, "carried no stack credential")
    day = _send(stack.bus, endpoint, GetDayState())  # read-only requests need no credential
    assert getattr(day, "kill_switch", None) is False
    assert _ledger_rows_mentioning(db_url, "intruder-") == {}
    assert stack.find(resting["order_id"])["status"] not in ("CANCELLED", "REJECTED")
    status = _send(stack.bus, endpoint, GetStatus())
    assert isinstance(status, Reply) and status.ok


def test_the_stack_secret_is_private_and_never_logged_or_stored(stack: ExecStack) -> None:
    stack.ok(_execute("risk-secret-1", strategy="s-secret"))
    _send(stack.bus, stack.cfg.bus.endpoint("execution_rep"), _execute("intruder-3", strategy="intruder"))

    path = secret_path(stack.home)
    st = path.stat()
    secret = read_secret(stack.home)

    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert secret is not None and len(secret) == 64
    texts = [p.read_text(errors="replace") for p in [*(stack.home / "log").glob("*"),
                                                     stack.home / "execution.out"] if p.is_file()]
    assert texts and not any(secret.decode() in t for t in texts)
    assert _ledger_rows_mentioning(stack.env["NEOPULSE_DATABASE__URL"], secret.decode()) == {}
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".stack.secret")]


def test_neopulse_presents_the_stack_secret_and_explains_a_refusal(stack: ExecStack, tmp_path: Path) -> None:
    other_home = {**stack.env, "NEOPULSE_HOME": str(tmp_path / "elsewhere"),
                  "NEOPULSE_BUS__REQUEST_TIMEOUT_MS": "600"}

    flat = stack.cli("flatten", "--strategy", "nobody", "--yes", "--json")
    kill = subprocess.run([*NEOPULSE, "kill-switch", "on", "--reason", "wrong home"], cwd=ROOT,
                          env=other_home, capture_output=True, text=True, timeout=60, check=False)

    assert flat.returncode == 0, flat.stderr
    assert json.loads(flat.stdout)["cancelled"] == 0
    # risk is not running; execution is, but refuses a CLI that cannot read this stack's secret
    assert kill.returncode == 3, kill
    assert "execution did not record the kill switch (unauthorised:" in kill.stderr
    assert "NEOPULSE_HOME" in kill.stderr and "Traceback" not in kill.stderr
    assert _send(stack.bus, stack.cfg.bus.endpoint("execution_rep"), GetDayState()).kill_switch is False  # type: ignore[union-attr]


def test_neopulse_with_no_stack_running_says_so(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home", free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
                    NEOPULSE_BUS__REQUEST_TIMEOUT_MS="500")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*NEOPULSE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)

    flat = cli("flatten", "--yes")
    kill = cli("kill-switch", "on", "--reason", "nothing running")

    assert flat.returncode == 3 and "execution is unreachable" in flat.stderr, flat
    assert kill.returncode == 3 and "execution did not record the kill switch (no reply)" in kill.stderr, kill
    assert not secret_path(tmp_path / "home").exists()  # the CLI reads the secret, never makes one


def test_concurrent_starters_share_one_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code = ("import sys; from pathlib import Path;"
            "from libs.common.stack_secret import load_or_create_secret;"
            "print(load_or_create_secret(Path(sys.argv[1])).decode())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]

    values = {p.communicate(timeout=30)[0].strip() for p in procs}

    assert len(values) == 1 and len(next(iter(values))) == 64
    assert read_secret(home) == next(iter(values)).encode()
    assert stat.S_IMODE(secret_path(home).stat().st_mode) == 0o600
    assert [p.name for p in (home / "run").iterdir()] == ["stack.secret"]  # no temporary file left


def test_a_secret_others_can_read_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    path = secret_path(tmp_path)
    load_or_create_secret(tmp_path)

    path.chmod(0o644)
    with pytest.raises(StackSecretError, match="not private"):
        read_secret(tmp_path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(StackSecretError, match="damaged"):
        load_or_create_secret(tmp_path)


# --------------------------------------------------------------------------- with CURVE


@pytest.fixture
def curve_execution(tmp_path: Path, pg_url: str) -> Iterator[dict[str, Any]]:
    home = tmp_path / "home"
    env = stack_env(home, free_base_port(), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
                    NEOPULSE_BUS__CURVE="true", NEOPULSE_DATABASE__URL=pg_url)
    keys = subprocess.run([*NEOPULSE, "keys", "generate"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert keys.returncode == 0, keys.stderr
    cfg = load_config(env=env)
    buses: dict[str, Bus] = {}
    for identity in ("risk", "admin", "strategy-mom1"):
        buses[identity] = Bus(cfg)
        install_curve(buses[identity], cfg, identity)
    with (home / "execution.out").open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.execution"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = cfg.bus.endpoint("execution_rep")

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((home / "execution.out").read_text()[-3000:])
        try:
            reply = _send(buses["admin"], endpoint, GetStatus(), timeout_ms=500)
        except RequestTimeout:
            return False
        return isinstance(reply, Reply) and reply.ok

    try:
        eventually(answers, 40, 0.2, message="execution up with CURVE")
        yield {"home": home, "endpoint": endpoint, "buses": buses}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for bus in buses.values():
            bus.close()


def test_with_curve_execute_order_from_a_key_other_than_risks_is_refused(
    curve_execution: dict[str, Any]
) -> None:
    home, endpoint, buses = curve_execution["home"], curve_execution["endpoint"], curve_execution["buses"]

    from_admin = _send(buses["admin"], endpoint, _execute("curve-admin-1", strategy="intruder"))
    from_strategy = _send(buses["strategy-mom1"], endpoint, _execute("curve-strat-1", strategy="intruder"))
    cancel_from_strategy = _send(buses["strategy-mom1"], endpoint, CancelEntries(request_id="curve-c1"))
    cancel_from_admin = _send(buses["admin"], endpoint, CancelEntries(request_id="curve-c2"))
    from_risk = _send(buses["risk"], endpoint, _execute("curve-risk-1", strategy="s1"))

    _assert_unauthorised(from_admin, "ExecuteOrder", "the sender's CURVE key is admin's")
    _assert_unauthorised(from_strategy, "ExecuteOrder", "the sender's CURVE key")
    _assert_unauthorised(cancel_from_strategy, "CancelEntries", "is not risk or admin's")
    assert isinstance(cancel_from_admin, Reply) and cancel_from_admin.ok, cancel_from_admin
    assert isinstance(from_risk, Reply) and from_risk.ok, from_risk
    orders = _send(buses["admin"], endpoint, GetOrders())
    assert isinstance(orders, Reply)
    assert [o["request_id"] for o in orders.data] == ["curve-risk-1"]
    refused = _log_lines(home, "sender_refused")
    assert {r["request_id"] for r in refused} == {"curve-admin-1", "curve-strat-1", "curve-c1"}
    assert not secret_path(home).exists()  # with CURVE the key is the proof: no stack secret
