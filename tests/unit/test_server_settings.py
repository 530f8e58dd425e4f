"""Server settings from env and flags, and where the model comes from."""

from __future__ import annotations

import pytest

from embedkit.errors import ConfigError
from embedkit.server.settings import ServerSettings, choose_model


def test_sagemaker_port_and_embedkit_names_are_read_and_typed():
    s = ServerSettings.from_env({"SAGEMAKER_BIND_TO_PORT": "9001", "EMBEDKIT_BATCH_WAIT_MS": "0.5"})
    assert (s.port, s.batch_wait_ms, s.host) == (9001, 0.5, "127.0.0.1")
    assert ServerSettings.from_env({"SAGEMAKER_BIND_TO_PORT": "9001", "EMBEDKIT_PORT": "7"}).port == 7


def test_endpoint_names_default_to_any_and_split_on_commas():
    assert ServerSettings().endpoint_names is None
    assert ServerSettings(endpoint_name="a, b").endpoint_names == frozenset({"a", "b"})


@pytest.mark.parametrize(
    "env",
    [{"EMBEDKIT_HF_MODE": "tokens"}, {"EMBEDKIT_PORT": "70000"}, {"EMBEDKIT_MAX_BODY_BYTES": "0"}],
)
def test_impossible_settings_are_config_errors(env):
    with pytest.raises(ConfigError):
        ServerSettings.from_env(env)


def test_api_key_is_masked_when_printed():
    assert ServerSettings(api_key="abc").to_dict()["api_key"] == "***"


def test_model_comes_from_the_flag_then_the_sagemaker_model_dir_then_default(tmp_path):
    empty = {"SM_MODEL_DIR": str(tmp_path / "absent")}
    assert choose_model(None, empty) == ("default", None)
    assert choose_model("./m", empty)[0] == "./m"
    (tmp_path / "modules.json").write_text("[]")
    spec, model_dir = choose_model(None, {"SM_MODEL_DIR": str(tmp_path)})
    assert spec == str(tmp_path) and model_dir == tmp_path
    code_only = tmp_path / "code-only"
    (code_only / "code").mkdir(parents=True)
    assert choose_model(None, {"SM_MODEL_DIR": str(code_only)}) == ("default", code_only)


def test_a_model_given_as_a_path_is_its_own_model_dir_and_a_hub_id_keeps_opt_ml_model(tmp_path):
    sm = tmp_path / "opt-ml-model"
    (sm / "code").mkdir(parents=True)
    env = {"SM_MODEL_DIR": str(sm)}
    local = tmp_path / "my-model"
    local.mkdir()
    assert choose_model(str(local), env) == (str(local), None)  # the server finds local/code itself
    assert choose_model("s3://bucket/model.tar.gz", env) == ("s3://bucket/model.tar.gz", None)
    assert choose_model("BAAI/bge-small-en-v1.5", env) == ("BAAI/bge-small-en-v1.5", sm)  # HF_MODEL_ID
    assert choose_model("default", env) == ("default", sm)


def test_hf_mode_tei_is_a_mode():
    assert ServerSettings.from_env({"EMBEDKIT_HF_MODE": "tei"}).hf_mode == "tei"
