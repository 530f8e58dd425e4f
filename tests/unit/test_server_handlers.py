"""Finding and importing custom inference.py handlers (sagemaker-inference-toolkit hooks)."""

from __future__ import annotations

import pytest

from embedkit.errors import ConfigError
from embedkit.server.handlers import load_handler


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_code_dir_means_no_handler(tmp_path):
    assert load_handler(None, None, tmp_path) is None


def test_code_inference_py_in_the_model_dir_is_found_and_hooks_get_context_only_if_they_take_it(tmp_path):
    write(
        tmp_path / "code" / "inference.py",
        "def input_fn(body, content_type):\n    return ('in', body, content_type)\n"
        "def output_fn(prediction, accept, context):\n    return (prediction, accept, context.model_dir)\n",
    )
    h = load_handler(None, None, tmp_path)
    assert h is not None and h.defined == ["input_fn", "output_fn"]
    assert h.model_fn is None and h.predict_fn is None and h.transform_fn is None
    assert h.input_fn(b"x", "text/csv") == ("in", b"x", "text/csv")
    assert h.output_fn("p", "application/json") == ("p", "application/json", str(tmp_path))


def test_sagemaker_program_in_submit_directory(tmp_path):
    write(tmp_path / "src" / "handler.py", "def predict_fn(data, model):\n    return 42\n")
    h = load_handler("handler.py", str(tmp_path / "src"), None)
    assert h is not None and h.predict_fn("d", "m") == 42


def test_missing_program_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.py"):
        load_handler("nope.py", str(tmp_path), None)


def test_remote_submit_directory_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.tar\.gz"):
        load_handler("inference.py", "s3://bucket/code.tar.gz", tmp_path)


def test_import_failure_is_a_config_error(tmp_path):
    write(tmp_path / "code" / "inference.py", "import no_such_module_anywhere\n")
    with pytest.raises(ConfigError, match="failed to import"):
        load_handler(None, None, tmp_path)


def test_transform_fn_with_other_hooks_is_refused(tmp_path):
    write(
        tmp_path / "code" / "inference.py",
        "def transform_fn(model, body, ct, accept):\n    return body\n"
        "def predict_fn(data, model):\n    return data\n",
    )
    with pytest.raises(ConfigError, match="either transform_fn"):
        load_handler(None, None, tmp_path)
