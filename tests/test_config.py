"""Config validation as a user meets it: every bad config names the file, the key, the bad value
and what is allowed, exits 2, prints no traceback, and never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli
from toolkit.config import RunConfig
from toolkit.config_io import load_config, parse_overrides
from toolkit.errors import ConfigError

BAD_CONFIGS = [
    # (yaml text, --set overrides, fragments the message must contain)
    ("data:\n  batchsize: 32\n", [], ["data.batchsize", "unknown key", "did you mean 'batch_size'"]),
    ("optim:\n  name: adamm\n", [], ["optim.name", "'adamm'", "'sgd'", "did you mean 'adam'"]),
    ("optim:\n  lr: -0.1\n", [], ["optim.lr: -0.1 must be greater than 0"]),
    ("train:\n  epochs: ten\n", [], ["train.epochs: 'ten' is not a whole number"]),
    ("data:\n  name: imagefolder\n", [], ["data.root", "is required for data.name 'imagefolder'"]),
    ("data:\n  name: imagefolder\n  root: /nonexistent/photos\n", [], ["data.root", "/nonexistent/photos", "does not exist"]),
    ("data:\n  channels: 2\n", [], ["data.channels", "2", "1 or 3"]),
    ("train:\n  mixed_precision: fp8\n", [], ["train.mixed_precision", "'fp8'", "'bf16'"]),
    ("schedule:\n  name: cosin\n", [], ["schedule.name", "did you mean 'cosine'"]),
    ("data:\n  val_fraction: 1.5\n", [], ["data.val_fraction: 1.5 must be less than 1"]),
    ("modle:\n  name: lenet\n", [], ["modle", "unknown key", "did you mean 'model'"]),
    ("train:\n  resume: true\n  overwrite: true\n", [], ["train.overwrite", "cannot be combined"]),
    ("", ["optim.momentum=1.5"], ["--set: optim.momentum: 1.5 must be less than 1"]),
    ("data: [1, 2]\n", [], ["data", "expected a section"]),
    ("optim:\n  lr: [0.1\n", [], ["not valid YAML", "line"]),
    ("model:\n  pretrained_weights: /no/such/weights.pt\n", [], ["model.pretrained_weights", "is not a file"]),
    ("data:\n  channels: 1\n  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n", [], ["data.mean", "needs 1 value"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BAD_CONFIGS)
def test_bad_config_message(tmp_path, text, overrides, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    first = message.splitlines()[0]
    assert first.startswith(str(path)) or first.startswith("--set"), first


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  name: adamm\n  lr: 0\ntrain:\n  epochs: -1\ndata:\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = [line.split(": ")[1] for line in info.value.problems]
    assert sorted(keys) == ["data.batchsize", "optim.lr", "optim.name", "train.epochs"]


def test_cli_bad_config_exits_2_without_traceback_or_torch(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  name: adamm\n")
    # In a fresh interpreter: the error must be reported before torch or accelerate is imported.
    code = ("import sys\nfrom toolkit.cli import main\nrc = main(['train', '--config', sys.argv[1]])\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'accelerate', 'torchvision') if m in sys.modules))\n"
            "sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {path}: optim.name: 'adamm' is not one of" in result.stderr
    assert "IMPORTED []" in result.stdout


def test_cli_exit_status_for_real_command(tmp_path):
    result = run_cli("train", "--config", "smoke.yaml", "--set", "train.epochs=0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: --set: train.epochs: 0 must be greater than 0") == 1
    assert "Traceback" not in result.stderr


def test_missing_config_file_suggests_name(tmp_path):
    result = run_cli("config", "show", "--config", "digit.yaml")
    assert result.returncode == 2
    assert "did you mean 'digits.yaml'" in result.stderr


def test_config_name_lookup_and_show():
    result = run_cli("config", "show", "--config", "digits", "--set", "optim.lr=3e-4", "--set", "data.augment.hflip=true")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["optim"]["lr"] == 3e-4
    assert shown["data"]["augment"]["hflip"] is True
    assert shown["data"]["name"] == "digits"
    assert shown["train"]["run_name"] == "digits"  # the file's name by default
    RunConfig.model_validate(shown)  # what show prints loads back


def test_schema_is_json_schema():
    result = run_cli("config", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"data", "model", "optim", "schedule", "train", "export", "serve"}
    data = schema["$defs"]["DataConfig"]["properties"]
    assert "description" in data["batch_size"]


def test_overrides_parse_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=null", "e=text"]) == {"a": {"b": 3, "c": [1, 2]}, "d": None, "e": "text"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["optim.lr"])


def test_bare_yaml_no_is_a_precision(tmp_path):
    """YAML 1.1 reads `no` as false; `mixed_precision: no` must still mean fp32, in a file and in --set."""
    path = tmp_path / "fp32.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    assert load_config("smoke.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config("smoke.yaml").train.mixed_precision == "auto"
    with pytest.raises(ConfigError, match=r"--set: train.mixed_precision: 'yes' is not one of 'auto', 'no', 'bf16' or 'fp16'"):
        load_config("smoke.yaml", ["train.mixed_precision=yes"])
    path.write_text("train:\n  mixed_precision: yes\n")
    with pytest.raises(ConfigError, match=r"mixed_precision: True is not one of .*YAML reads a bare yes"):
        load_config(path)


def test_text_keys_keep_what_was_typed(tmp_path):
    """A run named `no`, `2024` or `off` is that name: in --set the text is kept as typed; in a file,
    where YAML has already made it false, the message says to quote it instead of silently falling
    back to the config file's name."""
    assert load_config("smoke.yaml", ["train.run_name=no"]).train.run_name == "no"
    assert load_config("smoke.yaml", ["train.run_name=2024"]).train.run_name == "2024"
    assert load_config("smoke.yaml", ["train.run_name=null"]).train.run_name == "smoke"
    assert load_config("smoke.yaml", ["train.epochs=3"]).train.epochs == 3  # numbers stay numbers
    path = tmp_path / "named.yaml"
    path.write_text("train:\n  run_name: no\n")
    with pytest.raises(ConfigError, match=r"named.yaml: train.run_name: False is not text: .* quote it"):
        load_config(path)
    path.write_text("train:\n  run_name: 'no'\n")
    assert load_config(path).train.run_name == "no"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    # imagefolder.yaml points at the user's own photos, which must exist: give it a folder
    cfg = load_config(path, [f"data.root={tmp_path}"] if path.name == "imagefolder.yaml" else [])
    assert cfg.train.run_name == path.stem  # runs/<config name> unless the file names its run
    # the model fits the data the config describes (a recipe with a wrong size or channel count fails here)
    import torch

    from toolkit.names import DATASETS
    from toolkit.models import build_model

    source = "imagefolder" if cfg.data.name == "imagefolder" else cfg.data.name
    channels = cfg.data.channels or DATASETS[source].channels
    size = cfg.data.image_size or DATASETS[source].image_size
    model = build_model(cfg.model.name, 10, channels, size, cfg.model.args).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_readme_config_reference_is_current():
    from toolkit.config_io import DOCS_END, DOCS_START, docs_markdown

    text = (ROOT / "README.md").read_text()
    block = text.split(DOCS_START)[1].split(DOCS_END)[0].strip()
    assert block == docs_markdown(), "run: toolkit config docs --write README.md"
