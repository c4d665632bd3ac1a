"""`--model` resolution: a checkpoint directory, a bundled model's short name, or the default."""
from __future__ import annotations

import json

from kvpilot.models import BUNDLED_MODEL, BUNDLED_MODELS, resolve_model


def test_bundled_names_resolve_to_shipped_checkpoints():
    assert resolve_model(None) == BUNDLED_MODEL
    for name, directory in BUNDLED_MODELS.items():
        assert resolve_model(name) == directory
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "llama", name
    v2 = json.loads((BUNDLED_MODELS["reasoner-v2"] / "config.json").read_text())
    assert v2["num_attention_heads"] > v2["num_key_value_heads"], "reasoner-v2 is the grouped-query model"


def test_a_directory_of_that_name_wins_and_other_paths_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reasoner-v2").mkdir()
    assert resolve_model("reasoner-v2") == tmp_path.joinpath("reasoner-v2").relative_to(tmp_path)
    assert resolve_model(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
