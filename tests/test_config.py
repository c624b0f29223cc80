import os

import pytest

from mtx_dist.config import Config, ConfigError, describe, load_config
from tests.helpers import REPO, run_cli

CONFIGS = os.path.join(REPO, "configs")


def test_tiny_cpu_toml_is_the_builtin_default():
    assert load_config(os.path.join(CONFIGS, "tiny-cpu.toml")) == Config()


@pytest.mark.parametrize("name,preset", [("vit-b16.toml", "vit-b16"), ("vit-l14.toml", "vit-l14")])
def test_shipped_configs_load(name, preset):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.model.preset == preset
    assert cfg.parallel.precision == "bf16"


def test_overrides_parse_types_and_bare_strings():
    cfg = load_config(None, ["model.preset=vit-b16", "optim.lr=3e-4", "run.steps=50", "optim.warmup_steps=5",
                             "run.eval_at_end=false", "data.train=/x/{000..009}.tar", 'run.name="a b"'])
    assert cfg.model.preset == "vit-b16" and cfg.optim.lr == 3e-4 and cfg.run.steps == 50
    assert cfg.run.eval_at_end is False and cfg.data.train == "/x/{000..009}.tar" and cfg.run.name == "a b"
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # int accepted for a float key


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[run]\nsteps = 7\nseed = 3\n[optim]\nwarmup_steps = 2\n')
    cfg = load_config(str(p), ["run.seed=4"])
    assert (cfg.run.steps, cfg.run.seed) == (7, 4)


@pytest.mark.parametrize("overrides,needle", [
    (["model.presett=tiny"], "unknown config key 'model.presett' (did you mean 'model.preset'?)"),
    (["model.preset=vit-b17"], "config key 'model.preset' = 'vit-b17': unknown model preset 'vit-b17' (did you mean 'vit-b16'?)"),
    (["run.steps=-1"], "config key 'run.steps' = -1: must be >= 1"),
    (["run.steps=ten"], "config key 'run.steps' = 'ten': expected int"),
    (["parallel.zero_stage=4"], "config key 'parallel.zero_stage' = 4: allowed values are 0, 1, 2, 3"),
    (["optim.lr=true"], "config key 'optim.lr' = True: expected float"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["run"], "not of the form section.key=value"),
    (["run.steps=10"], "config key 'optim.warmup_steps' = 30: must be <= run.steps (10)"),
    (["data.backend=dali", "data.mode=resampled"], "config key 'data.mode' = 'resampled': data.backend = 'dali'"),
    (["data.backend=dali", "data.train_weights=0.7,0.3"], "config key 'data.train_weights' = '0.7,0.3': mixing"),
    # checked when the config loads, before any process group or loader starts
    (["data.train=a-{0..3}.tar::b.tar", "data.train_weights=0.5"],
     "config key 'data.train_weights' = '0.5': 1 mixing weights for 2 sources in 'a-{0..3}.tar::b.tar'"),
    (["data.train=a.tar::b.tar", "data.train_weights=x,y"],
     "config key 'data.train_weights' = 'x,y': mixing weights 'x,y' must be comma-separated numbers"),
])
def test_bad_keys_and_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\npreset = 'tiny'\nlayers = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.layers'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_flat_params_and_describe_cover_every_key():
    flat = Config().flat()
    assert flat["run.dir"] == "runs/quickstart" and flat["model.preset"] == "tiny"
    text = describe()
    assert all(f"  {k.split('.', 1)[1]} = " in text for k in flat)


def test_a_key_that_is_a_python_keyword(tmp_path):
    """checkpoint.async (field async_): by that name on the command line, in TOML, in the saved config,
    in MLflow params and --help-config; the field's own name is not a key."""
    cfg = load_config(None, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True and cfg.flat()["checkpoint.async"] is True
    assert "[checkpoint]\n" in cfg.to_toml() and "async = true" in cfg.to_toml()
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load_config(str(p)) == cfg
    assert "  async = False  # asynchronous saves" in describe()
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint.async_' \\(did you mean 'checkpoint.async'"):
        load_config(None, ["checkpoint.async_=true"])


def test_cli_rejects_bad_key_before_starting(tmp_path):
    res = run_cli(["train", "model.presett=tiny"], cwd=str(tmp_path), timeout=120)
    assert res.returncode == 2
    assert "model.presett" in res.stderr and "did you mean 'model.preset'" in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    res = run_cli(["train", os.path.join(CONFIGS, "vit-b16.toml"), "data.batch_size=0"], cwd=str(tmp_path))
    assert res.returncode == 2 and "data.batch_size" in res.stderr and "must be >= 1" in res.stderr


def test_string_keys_take_text_as_written():
    cfg = load_config(None, ["run.dir=2024", "run.name=1e3", "data.train=/x/a.tar::/y/b.tar"])
    assert (cfg.run.dir, cfg.run.name, cfg.data.train) == ("2024", "1e3", "/x/a.tar::/y/b.tar")


def test_missing_shards_are_a_config_error(tmp_path):
    res = run_cli(["train", f"data.train={tmp_path}/nope-{{000..003}}.tar", "tracking.enabled=false"],
                  cwd=str(tmp_path), timeout=300)
    assert res.returncode == 2
    assert "config key 'data.train'" in res.stderr and "4 of 4 shards" in res.stderr and "do not exist" in res.stderr


def test_tracking_uri_precedence(monkeypatch):
    from mtx_dist.config import TrackingConfig
    from mtx_dist.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig()) == "sqlite:///mlflow.db"  # MLflow's own default, in the cwd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
