"""The GGUF conversion cache when two processes convert at once (a worker and a scorer
starting together): neither crashes, and both use one complete copy."""

from __future__ import annotations

import transformers

from models.llm import resolve_llm_folder


class FakeModel:
    """Stands in for the converted model: saving it writes a config, and meanwhile another
    process finishes its own conversion into the shared target."""

    def __init__(self, target) -> None:
        self.target, self.config, self.hf_quantizer = target, object(), None

    def save_pretrained(self, folder) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        self.target.mkdir(parents=True, exist_ok=True)  # the other process's rename lands first
        (self.target / "config.json").write_text('{"by": "the other process"}')


class FakeTokenizer:
    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{}")


def test_a_conversion_racing_another_uses_the_finished_copy(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = cache / "model"
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel(target)
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    assert resolve_llm_folder(str(gguf), cache) == target
    assert (target / "config.json").read_text() == '{"by": "the other process"}'
    assert [p.name for p in cache.iterdir()] == ["model"], "no temp folder left behind"
