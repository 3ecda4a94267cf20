"""Configuration layering (defaults → TOML → .env → environment), validation and redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.config import (
    Config,
    ConfigError,
    load_config,
    redacted,
    secret_values,
)
from libs.common.messages import BrokerName, FeedSource


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    cfg = load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})

    assert cfg == Config()
    assert cfg.bus.endpoint("risk_rep") == "tcp://127.0.0.1:7201"
    assert cfg.bus.host == "127.0.0.1"


def test_each_layer_overrides_the_one_before(tmp_path: Path) -> None:
    toml = _write(tmp_path / "neopulse.toml", """
[risk]
max_qty = 500
max_open_positions = 3
max_daily_loss = 2000
[telegram]
chat_id = "-100111"  # from the TOML
""")
    env_file = _write(tmp_path / "secrets.env",
                      "NEOPULSE_RISK__MAX_OPEN_POSITIONS=4\nNEOPULSE_RISK__MAX_DAILY_LOSS=3000\n"
                      "NEOPULSE_TELEGRAM__TOKEN=tok-from-dotenv\n")
    env = {"NEOPULSE_CONFIG": str(toml), "NEOPULSE_ENV_FILE": str(env_file),
           "NEOPULSE_RISK__MAX_DAILY_LOSS": "4000"}

    cfg = load_config(env=env)

    assert cfg.risk.max_qty == 500                 # TOML over default
    assert cfg.risk.max_open_positions == 4        # .env over TOML
    assert cfg.risk.max_daily_loss == 4000.0       # environment over .env
    assert cfg.risk.max_orders_per_sec == 10       # default untouched
    assert cfg.telegram.token == "tok-from-dotenv"
    assert cfg.telegram.chat_id == "-100111"


def test_neopulse_toml_in_working_directory_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "neopulse.toml", "[feed]\nsim_rate = 5.5\n")
    monkeypatch.chdir(tmp_path)

    cfg = load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})

    assert cfg.feed.sim_rate == 5.5


def test_environment_lists_are_json_and_scalars_are_coerced(tmp_path: Path) -> None:
    env = {"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"),
           "NEOPULSE_FEED__INSTRUMENTS": '["nse_cm|2885", "INFY-EQ"]',
           "NEOPULSE_BUS__CURVE": "true", "NEOPULSE_BUS__BASE_PORT": "8100",
           "NEOPULSE_FEED__SIM_RATE": "2.5"}

    cfg = load_config(env=env)

    assert cfg.feed.instruments == ["nse_cm|2885", "INFY-EQ"]
    assert cfg.bus.curve is True
    assert cfg.feed.sim_rate == 2.5
    assert cfg.bus.endpoint("risk_rep") == "tcp://127.0.0.1:8201"
    assert cfg.bus.endpoint("notifier_pub") == "tcp://127.0.0.1:8501"


def test_strategy_instances_come_from_toml_array_of_tables(tmp_path: Path) -> None:
    toml = _write(tmp_path / "n.toml", """
[[strategy]]
name = "momentum"
id = "mom1"
[[strategy]]
name = "macd"
id = "macd1"
params = { fast = 12 }
""")

    cfg = load_config(toml, env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})

    assert [(s.name, s.id) for s in cfg.strategy] == [("momentum", "mom1"), ("macd", "macd1")]
    assert cfg.strategy[1].params == {"fast": 12}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[risk]\nmax_qtyy = 5\n", "config error: unknown key `risk.max_qtyy`"),
        ("[riskk]\nmax_qty = 5\n", "config error: unknown key `riskk`"),
        ("[risk]\nmax_qty = 0\n", "config error: risk.max_qty: Expected `int` >= 1"),
        ("[risk]\nmax_qty = \"many\"\n", "config error: risk.max_qty: Expected `int`, got `str`"),
        ("[bus]\nbase_port = 70000\n", "config error: bus.base_port: Expected `int` <= 65535"),
        ("[feed]\nsource = \"yahoo\"\n", "config error: `feed.source` must be sim, replay or kotak"),
        ("[execution]\nbroker = \"zerodha\"\n", "config error: `execution.broker` must be paper or kotak"),
        ("[feed]\nmarket_hours = \"9 to 5\"\n", "config error: `feed.market_hours` must look like"),
        ("[[strategy]]\nname='momentum'\nid='a'\n[[strategy]]\nname='macd'\nid='a'\n",
         "config error: `strategy.id` ids must be unique"),
        ("[execution]\nlogout_at = \"3:45 pm\"\n",
         "config error: `execution.logout_at` must be empty (no daily logout) or a time of day HH:MM"),
        ("[kotak]\nlogin_at = \"8:99\"\n",
         "config error: `kotak.login_at` must be empty (no scheduled login) or a time of day HH:MM"),
        ("[risk\nmax_qty = 5\n", "invalid TOML"),
    ],
)
def test_bad_file_value_is_one_line_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = _write(tmp_path / "bad.toml", toml)

    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})

    text = str(exc.value)
    assert expected in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("NEOPULSE_RISK__MAX_QTYY", "5",
         "config error: NEOPULSE_RISK__MAX_QTYY: unknown key `risk.max_qtyy`"),
        ("NEOPULSE_RISK__MAX_QTY", "lots",
         "config error: NEOPULSE_RISK__MAX_QTY: `risk.max_qty`: Expected `int`"),
        ("NEOPULSE_BUS__CURVE", "maybe",
         "config error: NEOPULSE_BUS__CURVE: `bus.curve`: Expected `bool`"),
        ("NEOPULSE_RISKK__MAX_QTY", "5",
         "config error: NEOPULSE_RISKK__MAX_QTY: unknown config section `riskk`"),
        ("NEOPULSE_FEED__SOURCE", "yahoo",
         "config error: NEOPULSE_FEED__SOURCE: `feed.source` must be"),
        ("NEOPULSE_FEED__INSTRUMENTS", "[1, 2]",
         "config error: NEOPULSE_FEED__INSTRUMENTS: `feed.instruments[0]`"),
    ],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, var: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"), var: value})

    assert str(exc.value).startswith(expected)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("NEOPULSE_FEED__SOURCE", "Sim", "sim, replay or kotak"),
        ("NEOPULSE_EXECUTION__BROKER", "zerodha", "paper or kotak"),
    ],
)
def test_a_closed_key_accepts_only_its_words_and_lists_them(
    tmp_path: Path, var: str, value: str, words: str
) -> None:
    env = {"NEOPULSE_ENV_FILE": str(tmp_path / "none.env")}

    with pytest.raises(ConfigError) as exc:
        load_config(env={**env, var: value})
    cfg = load_config(env={**env, "NEOPULSE_FEED__SOURCE": "replay", "NEOPULSE_EXECUTION__BROKER": "kotak"})

    key = var.removeprefix("NEOPULSE_").lower().replace("__", ".")
    assert str(exc.value) == f"config error: {var}: `{key}` must be {words}"
    assert (cfg.feed.source, cfg.execution.broker) == (FeedSource.REPLAY, BrokerName.KOTAK)
    assert redacted(cfg)["feed"]["source"] == "replay" and type(redacted(cfg)["feed"]["source"]) is str


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(env={"NEOPULSE_CONFIG": str(tmp_path / "nope.toml"),
                         "NEOPULSE_ENV_FILE": str(tmp_path / "none.env")})


def test_reserved_variables_are_not_config_keys(tmp_path: Path) -> None:
    env = {"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"), "NEOPULSE_HOME": str(tmp_path),
           "NEOPULSE_LIVE": "1", "NEOPULSE_SERVICE": "risk", "NEOPULSE_CONSOLE_LEVEL": "DEBUG"}

    assert load_config(env=env) == Config()


def test_env_file_readable_by_others_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = _write(tmp_path / ".env", "NEOPULSE_TELEGRAM__TOKEN=123:abc\n", mode=0o644)

    load_config(env={"NEOPULSE_ENV_FILE": str(env_file)})

    err = capsys.readouterr().err
    assert "readable by other users" in err
    assert "chmod 600" in err
    assert "123:abc" not in err


def test_private_env_file_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = _write(tmp_path / ".env", "NEOPULSE_TELEGRAM__TOKEN=123:abc\n", mode=0o600)

    load_config(env={"NEOPULSE_ENV_FILE": str(env_file)})

    assert capsys.readouterr().err == ""


def test_redacted_hides_every_secret_and_secret_values_lists_them(tmp_path: Path) -> None:
    secrets = {
        "NEOPULSE_KOTAK__CONSUMER_KEY": "ck-SECRET-1111", "NEOPULSE_KOTAK__MOBILE": "+919999900000",
        "NEOPULSE_KOTAK__UCC": "UCC-SECRET", "NEOPULSE_KOTAK__MPIN": "864209",
        "NEOPULSE_KOTAK__TOTP_SECRET": "JBSWY3DPEHPK3PXP", "NEOPULSE_KOTAK__FEED_AUTH": "feed-auth-SECRET",
        "NEOPULSE_TELEGRAM__TOKEN": "999:TG-SECRET", "NEOPULSE_TELEGRAM__CHAT_ID": "-100777",
    }
    cfg = load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"), **secrets})

    text = repr(redacted(cfg))

    for value in secrets.values():
        assert value not in text
    assert redacted(cfg)["kotak"]["mpin"] == "***"
    assert redacted(cfg)["telegram"]["api_url"] == "https://api.telegram.org"
    assert set(secret_values(cfg)) == set(secrets.values())


def test_database_password_is_redacted_and_kept_out_of_logs(tmp_path: Path) -> None:
    url = "postgresql://neopulse:pg-S3cret-pw@db.internal:5432/neopulse"
    cfg = load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"), "NEOPULSE_DATABASE__URL": url})

    assert redacted(cfg)["database"]["url"] == "postgresql://neopulse:***@db.internal:5432/neopulse"
    assert "pg-S3cret-pw" in secret_values(cfg)
