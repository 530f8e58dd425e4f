"""One settings model: every field declared once, one precedence everywhere (flag > env > config
file > default), flags generated from the declarations, and the SageMaker container reading the
user's resolved settings whole."""

from __future__ import annotations

import json

import pytest

from embedkit.aws import settings as sm_settings
from embedkit.aws.settings import SageMakerSettings
from embedkit.batch.settings import JobSettings
from embedkit.cli import build_parser
from embedkit.client.settings import ClientSettings
from embedkit.commands.embed import settings_from_args
from embedkit.errors import ConfigError
from embedkit.server.settings import ServerSettings
from embedkit.settings import EngineSettings

# (settings class, field, value in a config file, in the environment, as a flag)
LAYERS = [
    (EngineSettings, "precision", "bf16", "int8", "fp16"),
    (EngineSettings, "max_batch_tokens", 100, "512", "0"),  # the explicit 0 ("automatic") wins
    (JobSettings, "unit_rows", 10, "20", "30"),
    (JobSettings, "resume", False, "yes", False),
    (ServerSettings, "port", 9000, "9001", "9002"),
    (ClientSettings, "max_batch", 8, "16", "24"),
    (SageMakerSettings, "instance_count", 2, "3", "4"),
]


@pytest.mark.parametrize(("cls", "name", "in_file", "in_env", "as_flag"), LAYERS)
def test_flag_beats_env_beats_config_beats_default(cls, name, in_file, in_env, as_flag):
    env = {cls.env_prefix + name.upper(): in_env}
    config = {name: in_file}
    default = cls.resolve(environ={})
    assert default.source(name) == "default"
    got = cls.resolve(environ={}, config=config)
    assert (getattr(got, name), got.source(name)) == (cls._coerce(name, in_file), "config")
    got = cls.resolve(environ=env, config=config)
    assert (getattr(got, name), got.source(name)) == (
        cls._coerce(name, in_env),
        f"env {cls.env_prefix + name.upper()}",
    )
    got = cls.resolve({name: as_flag}, environ=env, config=config)
    assert (getattr(got, name), got.source(name)) == (cls._coerce(name, as_flag), "flag")


def test_embed_command_line_flag_env_config_default(tmp_path):
    """The same order through `embedkit embed`: its flags, EMBEDKIT_*, its --config file."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text("max_batch_tokens: 100\nprecision: bf16\nunit_rows: 7\ndtype: float16\n")
    env = {"EMBEDKIT_MAX_BATCH_TOKENS": "512", "EMBEDKIT_PRECISION": "int8"}
    args = build_parser().parse_args(
        ["embed", "in/", "out/", "--config", str(cfg), "--max-batch-tokens", "0"]
    )
    s = settings_from_args(args, environ=env)
    assert (s.max_batch_tokens, s.source("max_batch_tokens")) == (0, "flag")  # not 512 from env
    assert (s.precision, s.source("precision")) == ("int8", "env EMBEDKIT_PRECISION")
    assert (s.unit_rows, s.dtype, s.source("unit_rows")) == (7, "float16", "config")
    assert (s.fail_fast, s.source("fail_fast")) == (False, "default")
    # legacy spellings are aliases of the one declaration, on the command line and in the file
    args = build_parser().parse_args(["embed", "--input_dir", "a/", "--output-path", "b/", "--no-checkpoint"])
    s = settings_from_args(args, environ={})
    assert (s.input, s.output, s.resume) == ("a/", "b/", False)


def test_an_explicit_zero_budget_beats_the_environment_in_the_engine_too(tiny_model):
    """`--max-batch-tokens 0` means automatic even with EMBEDKIT_MAX_BATCH_TOKENS set: the engine
    reads no environment, it takes what the settings resolved."""
    from embedkit.engine import build_embedder

    args = build_parser().parse_args(
        ["encode", "--model", str(tiny_model), "--device", "cpu", "--max-batch-tokens", "0", "x"]
    )
    env = {"EMBEDKIT_MAX_BATCH_TOKENS": "512"}
    emb = build_embedder(EngineSettings.from_args(args, env))
    assert emb.auto_budget and emb.max_batch_tokens != 512
    emb = build_embedder(EngineSettings.resolve({"model": str(tiny_model), "device": "cpu"}, environ=env))
    assert not emb.auto_budget and emb.max_batch_tokens == 512


def test_sagemaker_flags_env_file_and_code_defaults(tmp_path):
    cfg = tmp_path / "sm.yaml"
    cfg.write_text("sagemaker_instance: ml.g4dn.xlarge\nvolume_size: 50\nretries: 3\n")
    parser = build_parser()
    args = parser.parse_args(
        [
            "embed",
            "a",
            "b",
            "--sagemaker-config",
            str(cfg),
            "--sagemaker-retries",
            "1",
            "--sagemaker-env",
            "A=1",
        ]
    )
    s = sm_settings.from_args(args, environ={"EMBEDKIT_SAGEMAKER_VOLUME_SIZE": "80"})
    assert (s.retries, s.volume_size, s.instance, s.instance_count) == (1, 80, "ml.g4dn.xlarge", 1)
    assert s.environment == {"A": "1"}
    assert [s.source(n) for n in ("retries", "volume_size", "instance", "instance_count")] == [
        "flag",
        "env EMBEDKIT_SAGEMAKER_VOLUME_SIZE",
        "config",
        "default",
    ]
    # a processing_main script's own defaults sit between the file and the built-in defaults
    s = SageMakerSettings.build({}, config=str(cfg), environ={}, defaults={"retries": 9, "python": "py"})
    assert (s.retries, s.python) == (3, "py")


def test_the_container_reads_the_shipped_settings_whole_and_nothing_else(tmp_path):
    """What the SageMaker launcher ships (resolved on the user's side) is what the container runs:
    its own environment does not apply again."""
    user = JobSettings.build(
        {"input": "in/", "output": "out/", "unit_rows": 5}, environ={"EMBEDKIT_PRECISION": "bf16"}
    )
    shipped = tmp_path / "settings.json"
    shipped.write_text(user.to_json())
    assert set(json.loads(shipped.read_text())) == set(JobSettings.field_names())
    args = build_parser().parse_args(["embed", "--settings-json", str(shipped)])
    got = settings_from_args(args, environ={"EMBEDKIT_PRECISION": "fp16", "EMBEDKIT_UNIT_ROWS": "9"})
    assert got == user
    shipped.write_text(json.dumps({"inptu": "x"}))
    with pytest.raises(ConfigError, match="unknown fields"):
        settings_from_args(args)


@pytest.mark.parametrize(
    ("argv", "classes", "prefix"),
    [
        (["embed", "--help"], [JobSettings], "--"),
        (["serve", "--help"], [EngineSettings, ServerSettings], "--"),
        (["encode", "--help"], [EngineSettings], "--"),
        (["invoke", "--help"], [ClientSettings], "--"),
        (["embed", "--help"], [SageMakerSettings], "--sagemaker-"),
    ],
)
def test_every_declared_field_has_its_generated_flag(argv, classes, prefix, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    shown = capsys.readouterr().out
    for cls in classes:
        for name in cls.field_names():
            flag = prefix + name.replace("_", "-")
            assert f"{flag} " in shown or f"{flag}\n" in shown or f"{flag}," in shown, flag
            assert cls.env_names(name)[0] in shown.replace("\n", " ").replace("  ", ""), name


def test_booleans_are_switches_on_embed_and_values_elsewhere():
    parser = build_parser()
    s = settings_from_args(
        parser.parse_args(["embed", "a", "b", "--no-normalize", "--single-file"]), environ={}
    )
    assert (s.normalize, s.single_file) == (False, True)
    args = parser.parse_args(["serve", "--normalize", "false", "--allow-image-urls", "yes"])
    assert EngineSettings.from_args(args, {}).normalize is False
    assert ServerSettings.from_args(args, {}).allow_image_urls is True


def test_values_are_checked_against_the_declaration_whatever_the_source():
    with pytest.raises(ConfigError, match="dtype must be one of float32, float16"):
        JobSettings.resolve(environ={"EMBEDKIT_DTYPE": "int4"})
    with pytest.raises(ConfigError, match="unit_rows must be an integer"):
        JobSettings.resolve(config={"unit_rows": "many"}, environ={})
    with pytest.raises(ConfigError, match="unknown option 'batchsize'"):
        JobSettings.resolve(config={"batchsize": 3}, environ={})
