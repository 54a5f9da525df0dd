import pytest
from pydantic import ValidationError

from sandboxd.config import default_concurrent_creates, load_config


def test_defaults_without_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr("sandboxd.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config()
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.key_prefix == "sandboxd"
    assert config.reconcile_interval_s == 5.0
    assert config.max_concurrent_creates == default_concurrent_creates()
    assert (config.event_stream_maxlen, config.on_shutdown) == (100_000, "terminate")
    assert "base" in config.local.all_templates()


@pytest.mark.parametrize(("cpus", "creates"), [(None, 8), (1, 8), (2, 8), (4, 16), (64, 64)])
def test_concurrent_creates_sized_to_the_host(monkeypatch, cpus, creates):
    monkeypatch.setattr("sandboxd.config.os.cpu_count", lambda: cpus)
    assert default_concurrent_creates() == creates


def test_file_then_environment(monkeypatch, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'key_prefix = "fromfile"\nreconcile_interval_s = 2\n'
        '[local]\nworkspace_root = "/srv/x"\n'
        '[local.templates.py]\nsetup = "true"\n'
    )
    monkeypatch.setenv("SANDBOXD_RECONCILE_INTERVAL_S", "7")
    monkeypatch.setenv("SANDBOXD_LOCAL__ISOLATION", "none")
    config = load_config(path)
    assert config.key_prefix == "fromfile"
    assert config.reconcile_interval_s == 7
    assert str(config.local.workspace_root) == "/srv/x"
    assert config.local.isolation == "none"
    assert config.local.all_templates()["py"].setup == "true"


@pytest.mark.parametrize("url", ["redis://u:p@h:1/0", "rediss://h:6380", "unix:///run/r.sock"])
def test_redis_url_schemes(monkeypatch, url):
    monkeypatch.setenv("SANDBOXD_REDIS_URL", url)
    assert load_config().redis_url == url


def test_bad_values_are_rejected(monkeypatch, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('redis_url = "http://x"\non_shutdown = "explode"\nbogus = 1\n')
    with pytest.raises(ValidationError) as caught:
        load_config(path)
    fields = {e["loc"][0] for e in caught.value.errors()}
    assert fields == {"redis_url", "on_shutdown", "bogus"}


def test_missing_explicit_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")
