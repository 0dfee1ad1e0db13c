import pytest

from segspark.config import load_config, parse_override, redact
from segspark.errors import ConfigError

from .conftest import REPO


def write(path, text):
    path.write_text(text)
    return path


def test_local_config_loads_with_base_defaults():
    cfg = load_config(REPO / "conf/local.yaml")
    assert cfg.input.format == "parquet"
    assert cfg.models.kmeans.k is None  # from base.yaml: chosen by the sweep
    assert (cfg.models.selection.k_min, cfg.models.selection.k_max) == (3, 8)
    assert list(cfg.models.enabled()) == ["kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"]
    assert cfg.features.session_gap_minutes == 30


def test_set_overrides_any_key_with_typed_values():
    cfg = load_config(
        REPO / "conf/local.yaml",
        ["models.kmeans.k=7", "input.path=/data/ev", "output.root=/tmp/o", "spark.conf.spark.foo=1"],
    )
    assert cfg.models.kmeans.k == 7
    assert cfg.input.path == "/data/ev"
    assert cfg.output.root == "/tmp/o"


def test_unknown_key_names_key_and_file(tmp_path):
    child = write(tmp_path / "c.yaml", f"extends: {REPO / 'conf/base.yaml'}\nmodels:\n  kmeans:\n    kk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "models.kmeans.kk" in message and "unknown key" in message and str(child) in message


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    child = write(tmp_path / "c.yaml", f"extends: {REPO / 'conf/base.yaml'}\nfeatures:\n  session_gap_minutes: soon\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "features.session_gap_minutes" in message
    assert str(child) in message
    assert "expected an integer" in message and "'soon'" in message


def test_wrong_type_from_set_is_attributed_to_set():
    with pytest.raises(ConfigError, match=r"models\.kmeans\.k \(in --set\): expected an integer"):
        load_config(REPO / "conf/local.yaml", ["models.kmeans.k=many"])


def test_stream_trigger_takes_fractions_of_a_second():
    assert load_config(REPO / "conf/local.yaml").streaming.trigger_seconds == 10
    assert load_config(REPO / "conf/local.yaml", ["streaming.trigger_seconds=0.5"]).streaming.trigger_seconds == 0.5
    with pytest.raises(ConfigError, match=r"streaming\.trigger_seconds \(in --set\)"):
        load_config(REPO / "conf/local.yaml", ["streaming.trigger_seconds=0"])


def test_bad_enum_and_event_type_target():
    with pytest.raises(ConfigError, match="input.format"):
        load_config(REPO / "conf/local.yaml", ["input.format=xml"])
    with pytest.raises(ConfigError, match="input.event_types.view"):
        load_config(REPO / "conf/local.yaml", ["input.event_types.view=looked"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("no-equals-sign")


def test_k_range_must_be_ordered():
    with pytest.raises(ConfigError, match="k_max"):
        load_config(REPO / "conf/local.yaml", ["models.selection.k_min=6", "models.selection.k_max=4"])


def test_config_hash_is_stable_and_tracks_values():
    a = load_config(REPO / "conf/local.yaml")
    b = load_config(REPO / "conf/local.yaml")
    c = load_config(REPO / "conf/local.yaml", ["models.kmeans.k=6"])
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert len(a.config_hash()) == 64


def test_secrets_are_redacted_in_logged_config():
    shown = redact({"mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example/x"}, "db": {"password": "p"}})
    assert shown["db"]["password"] == "***"
    assert "hunter2" not in shown["mlflow"]["tracking_uri"]


def test_resolved_config_is_logged_redacted_at_debug(caplog):
    caplog.set_level("DEBUG", logger="segspark.config")
    load_config(REPO / "conf/local.yaml", ["mlflow.tracking_uri=https://u:s3cret@host/"])
    full = [r for r in caplog.records if "resolved config" in r.getMessage()]
    assert [r.levelname for r in full] == ["DEBUG"] and "s3cret" not in caplog.text


def test_info_logs_one_short_config_line(caplog):
    caplog.set_level("INFO", logger="segspark.config")
    load_config(REPO / "conf/local.yaml", ["input.path=https://u:in-pass-1@host/events"])
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "conf/local.yaml" in line and "(hash " in line and "| output " in line
    assert "models kmeans, bisecting_kmeans, gmm, ae_hdbscan" in line
    assert "in-pass-1" not in line and "resolved config" not in line and len(line) < 400


def test_set_keys_with_dots_inside_free_form_sections():
    cfg = load_config(
        REPO / "conf/local.yaml",
        ["spark.conf.spark.driver.memory=8g", "input.options.header=true", "input.event_types.add_to_cart=cart"],
    )
    assert cfg.spark.conf == {"spark.driver.memory": "8g"}
    assert cfg.input.options == {"header": "true"}
    assert cfg.input.event_types["add_to_cart"] == "cart"


def test_nested_value_in_spark_conf_is_an_error(tmp_path):
    child = write(tmp_path / "c.yaml", f"extends: {REPO / 'conf/base.yaml'}\nspark:\n  conf:\n    spark:\n      x: 1\n")
    with pytest.raises(ConfigError, match=r"spark\.conf\.spark"):
        load_config(child)
