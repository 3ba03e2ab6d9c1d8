"""Loading a causal language model and its tokenizer: the bundled model, a folder, a hub id."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"arith-tiny": ASSETS / "arith-tiny", "lookup-tiny": ASSETS / "lookup-tiny"}
"""Models shipped inside the package, by name."""


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally, and no hub could be (or may be) reached."""


@dataclass(frozen=True)
class LanguageModel:
    """A causal LM ready for attribution: the Hugging Face ``model`` (eval mode) and ``tokenizer``.

    ``name`` is what the user asked for; ``path`` the folder it was loaded from (``None`` when
    it came from a hub cache).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path | None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (with a ``device_map``, the first
        device of the split model; its hooks move activations between the parts)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def split(self) -> bool:
        """Whether the model was loaded with a ``device_map`` over several devices (or with
        parts offloaded to disk): :mod:`accelerate` hooks move activations between parts."""
        devices = set(getattr(self.model, "hf_device_map", {}).values())
        return len(devices) > 1 or bool(devices & {"disk", "meta"})

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt + answer, special tokens included) the model takes."""
        return context_length(self.model.config, self.tokenizer)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub cache already holds this repo's config (then no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id, or an old huggingface_hub
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub endpoint, so an offline machine fails in seconds
    rather than after transformers' minute of retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(names)}")
    return names[dtype]


def _source(name: str) -> tuple[str, Path | None, dict]:
    """Where ``name`` loads from: ``(source for from_pretrained, local folder or None,
    from_pretrained keyword arguments)``.

    Raises:
        ModelNotFoundError: a missing folder, or a hub id with no hub reachable and no cache.
    """
    if not name.strip():
        raise ValueError("empty model name or path")
    path = BUNDLED.get(name)
    if path is None:
        candidate = Path(name).expanduser()
        looks_like_path = (
            candidate.is_absolute() or name.startswith((".", "~")) or candidate.exists()
        )
        if candidate.exists():
            path = candidate
        elif looks_like_path or name.count("/") > 1:
            # A hub id is 'name' or 'owner/name'; anything else can only be a folder.
            raise ModelNotFoundError(f"no model folder at {candidate}")
    if path is not None:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a model folder (expected config.json, weights and tokenizer files "
                "saved with save_pretrained)"
            )
        return str(path), path, {"local_files_only": True}
    cached = _hub_cached(name)
    if not cached and not _hub_offline() and not _hub_reachable():
        raise ModelNotFoundError(
            f"could not load {name!r}: not a local folder, not in the hub cache, and the "
            "hub cannot be reached from this machine. Pass a folder saved with "
            "save_pretrained, or 'arith-tiny' for the bundled model."
        )
    return name, None, {"local_files_only": _hub_offline() or cached}


def context_length(config: object, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest sequence (prompt + answer, special tokens included) a model with this
    config and tokenizer takes: the smaller of its position limit and the tokenizer's."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    tok_max = tokenizer.model_max_length
    limits = [x for x in (n, tok_max) if isinstance(x, int) and 0 < x < 10**9]
    return min(limits) if limits else 10**9


def load_tokenizer(
    name_or_path: str | os.PathLike, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, int]:
    """The tokenizer of a model and its context length (:func:`context_length`), without
    loading its weights: for checking prompts before the (slow) model load.

    Raises:
        ModelNotFoundError: as :func:`load_model`.
    """
    from transformers import AutoConfig

    source, _, kwargs = _source(str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **kwargs
        )
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"could not load the tokenizer of {name_or_path!r}: {e}") from e
    return tokenizer, context_length(config, tokenizer)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
FULL_HASH_BYTES = 256 * 2**20
"""Weight files up to this size are hashed whole; larger ones by their size and 64 evenly
spaced 1 MiB blocks (a 70B model's 140 GB would take minutes to read)."""


def _hash_file(digest: object, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())  # type: ignore[attr-defined]
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES or path.suffix not in WEIGHT_SUFFIXES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)  # type: ignore[attr-defined]
            return
        block = 2**20
        for i in range(64):
            f.seek((size - block) * i // 63)
            digest.update(f.read(block))  # type: ignore[attr-defined]


def fingerprint(lm: LanguageModel) -> str:
    """A hash of the model's weights, config and tokenizer, for a run's identity (a resumed
    run on weights overwritten in place is refused, not merged with the old results).

    A folder: its config, generation config (greedy answers' stops), tokenizer and weight
    files (see :data:`FULL_HASH_BYTES`). A model
    from a hub cache: its parameters in memory and its tokenizer's vocabulary."""
    import hashlib

    digest = hashlib.sha256()
    if lm.path is not None:
        for f in sorted(lm.path.iterdir()):
            if f.is_file() and (
                f.suffix in WEIGHT_SUFFIXES
                or f.name.startswith(
                    (
                        "config",
                        "generation_config",
                        "tokenizer",
                        "special_tokens",
                        "added_tokens",
                        "vocab",
                        "merges",
                        "chat_template",
                    )
                )
                or f.suffix == ".model"
            ):
                _hash_file(digest, f)
        return digest.hexdigest()[:16]
    for name, param in sorted(lm.model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)  # at most 64k values per tensor
        sample = flat[::step].float().cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
        digest.update(sample)
    digest.update(json_bytes(lm.tokenizer.get_vocab()))
    return digest.hexdigest()[:16]


def json_bytes(obj: object) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True).encode()


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a causal LM and its tokenizer.

    A model larger than one device is split in one process with ``device_map`` (Hugging Face
    Accelerate's big-model inference): layers are placed on the GPUs in order, then on the
    CPU, then on disk (``offload_folder``), and hooks move activations, and gradients on the
    way back, between them. Every method runs on a split model; gradient methods pay the
    transfers, perturbation methods the disk reads of offloaded layers on every pass.

    Args:
        name_or_path: ``"arith-tiny"`` (the bundled arithmetic model), a local folder saved with
            ``save_pretrained``, or a Hugging Face hub id (needs a reachable hub or a cached copy).
        device: where to put the model (default: CPU). Not with ``device_map``.
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ``"float16"``, …
        trust_remote_code: allow the model's own code from the hub; off unless asked for.
        device_map: ``"auto"`` (fill the devices in order within ``max_memory``),
            ``"balanced"``, ``"sequential"``, or module name -> device (``0``, ``"cuda:1"``,
            ``"cpu"``, ``"disk"``), as ``from_pretrained`` takes it. Needs ``accelerate``.
        max_memory: device -> the most memory for weights there, e.g.
            ``{0: "20GiB", "cpu": "60GiB"}``; what does not fit goes to disk.
        offload_folder: where disk-offloaded weights go (default: a temporary folder, removed
            when the process ends).

    Raises:
        ModelNotFoundError: a missing folder, or a hub id with no hub reachable (``HF_HUB_OFFLINE``
            set, or no network) and no cached copy.
        ValueError: ``device`` with ``device_map``, or ``max_memory`` / ``offload_folder``
            without it.
        ImportError: ``device_map`` without ``accelerate`` installed.
    """
    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype) or torch.float32
    split = _split_kwargs(device, device_map, max_memory, offload_folder)
    source, path, kwargs = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **kwargs
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs, **split
        )
    except OSError as e:
        if path is not None:
            raise ModelNotFoundError(f"could not load the model folder {path}: {e}") from e
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if _hub_offline()
            else "the hub could not be reached (or has no such model) and it is not cached"
        )
        raise ModelNotFoundError(
            f"could not load {name!r}: not a local folder, and {why}. Pass a folder saved with "
            "save_pretrained, or 'arith-tiny' for the bundled model."
        ) from e
    if tokenizer.pad_token is None:
        # Batching needs a pad token; the EOS token is the usual stand-in for causal LMs.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    model.eval()
    if device is not None:
        model.to(device)
    if split and model.get_input_embeddings().weight.device.type == "meta":
        raise ValueError(
            "device_map put the input embeddings on disk; give the first device room for "
            "them (max_memory) or place 'model.embed_tokens' on a device"
        )
    return LanguageModel(model=model, tokenizer=tokenizer, name=name, path=path)


def _split_kwargs(
    device: torch.device | str | None,
    device_map: str | dict[str, int | str] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | os.PathLike | None,
) -> dict[str, object]:
    """``from_pretrained``'s big-model arguments, checked before anything loads."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder apply only with a device_map")
        return {}
    if device is not None:
        raise ValueError(
            f"give device ({device}) or device_map, not both: a device_map places the model"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ImportError("device_map needs the accelerate package: pip install accelerate") from e
    if offload_folder is None:
        import atexit
        import shutil
        import tempfile

        offload_folder = tempfile.mkdtemp(prefix="tokattr-offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    out: dict[str, object] = {"device_map": device_map, "offload_folder": str(offload_folder)}
    if max_memory is not None:
        # GPU indices may come as text from a YAML / JSON config ("0"); accelerate wants ints.
        out["max_memory"] = {
            int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()
        }
    return out


def reinitialised(lm: LanguageModel, seed: int = 0) -> LanguageModel:
    """The same architecture, tokenizer, dtype and device with freshly initialised weights
    (``AutoModelForCausalLM.from_config`` under ``torch.manual_seed(seed)``): the model of the
    randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).
    The global RNG is restored afterwards.

    Raises:
        ValueError: the re-initialised weights equal the model's (a model that was itself
            built from its config with this seed): every method would pass the check.
    """
    if lm.split:
        raise ValueError(
            "the randomisation check needs a second, re-initialised copy of the model on one "
            "device; a model split by device_map has no such device (leave "
            "randomization_spearman out of the metrics)"
        )
    ref = lm.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(ref.config, dtype=ref.dtype)
    model.to(lm.device)
    mine, theirs = model.state_dict(), ref.state_dict()
    if mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(
            f"the model re-initialised with seed {seed} has the same weights as {lm.name!r} "
            "(it was itself initialised from its config with that seed), so the randomisation "
            "check could not fail; choose another randomization_seed"
        )
    model.eval()
    model.requires_grad_(False)
    return LanguageModel(
        model=model, tokenizer=lm.tokenizer, name=f"{lm.name} (re-initialised)", path=None
    )
