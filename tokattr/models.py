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
        return next(self.model.parameters()).device

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
) -> LanguageModel:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"arith-tiny"`` (the bundled arithmetic model), a local folder saved with
            ``save_pretrained``, or a Hugging Face hub id (needs a reachable hub or a cached copy).
        device: where to put the model (default: CPU).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ``"float16"``, …
        trust_remote_code: allow the model's own code from the hub; off unless asked for.

    Raises:
        ModelNotFoundError: a missing folder, or a hub id with no hub reachable (``HF_HUB_OFFLINE``
            set, or no network) and no cached copy.
    """
    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype) or torch.float32
    source, path, kwargs = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **kwargs
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
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
    return LanguageModel(model=model, tokenizer=tokenizer, name=name, path=path)


def reinitialised(lm: LanguageModel, seed: int = 0) -> LanguageModel:
    """The same architecture, tokenizer, dtype and device with freshly initialised weights
    (``AutoModelForCausalLM.from_config`` under ``torch.manual_seed(seed)``): the model of the
    randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).
    The global RNG is restored afterwards.

    Raises:
        ValueError: the re-initialised weights equal the model's (a model that was itself
            built from its config with this seed): every method would pass the check.
    """
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
