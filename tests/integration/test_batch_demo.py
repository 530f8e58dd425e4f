"""``make demo`` on the real default model: embed the bundled sample, export, search."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_embeds_the_sample_exports_and_finds_relevant_sentences(tmp_path, capsys):
    from embedkit.demo import main

    out = tmp_path / "demo-output"
    assert main(str(out)) == 0
    printed = capsys.readouterr().out
    assert "$ embedkit" in printed and "embed" in printed and "search" in printed
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["complete"] and meta["rows"]["embedded"] == 600 and meta["dimension"] == 384
    assert meta["model"]["name"].endswith("all-MiniLM-L6-v2") and meta["id_column"] == "id"
    assert (out / "export" / "embeddings.npy").exists()
    block = printed.split("query: what happens when a function returns a value", 1)[1].split("query:", 1)[0]
    top = block.strip().splitlines()[0]
    assert "return" in top.lower()  # the best match for a question about return values talks about them
