"""The CLI's front door: info, encode, errors as exit codes."""

from __future__ import annotations

import json

from embedkit.cli import main


def test_info_prints_model_facts_as_json(tiny_model, capsys):
    assert main(["info", str(tiny_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimension"] == 32 and info["max_seq_length"] == 32 and info["pooling"] == "mean"
    assert info["content_hash"].startswith("sha256:") and info["parameters"] > 0


def test_info_on_missing_hub_model_exits_2_with_message(capsys):
    assert main(["info", "BAAI/bge-m3"]) == 2
    err = capsys.readouterr().err
    assert "never downloads" in err and "Traceback" not in err


def test_encode_prints_vectors(tiny_model, capsys):
    assert main(["encode", "--model", str(tiny_model), "hello world", "a cat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dimension"] == 32 and len(out["embeddings"]) == 2


def test_encode_bad_flag_value_exits_2(tiny_model, capsys):
    assert main(["encode", "--model", str(tiny_model), "--precision", "fp8", "x"]) == 2
    assert "precision" in capsys.readouterr().err


def test_importing_the_client_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, embedkit.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_importing_embedkit_sets_passive_openmp_unless_already_set():
    import os
    import subprocess
    import sys

    code = "import embedkit, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_importing_embedkit_caps_onednn_kernel_caches_unless_already_set():
    import os
    import subprocess
    import sys

    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    code = f"import embedkit, os; print(*(os.environ[n] for n in {names!r}))"
    env = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["16", "16"]
    env.update(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="7")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1024", "7"]
