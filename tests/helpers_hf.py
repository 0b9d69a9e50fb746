"""Build tiny (or realistic) HF checkpoints at test time, and ask HF transformers for the truth.

Nothing is downloaded: :func:`build_checkpoint` makes a random-weight model of any of the
four architectures with transformers, writes it with ``save_pretrained`` (optionally
sharded), trains a small byte-level BPE tokenizer with ``tokenizers`` on built-in text,
and writes tokenizer.json, tokenizer_config.json (with a chat template) and
generation_config.json. GPU tests reuse it with realistic sizes and ``dtype="bfloat16"``.

Weights are drawn N(0, weight_std) (norm weights 1 + N(0, 0.1), biases N(0, weight_std)):
HF's default init (std 0.02, norms = 1, biases = 0) would leave the logits so flat that
greedy ties were everywhere and norm/bias handling went untested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS_ID, EOS_ID = 0, 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A runtime that owns the GPU schedules its own work.
Once upon a time, a small model learned to count: one, two, three, four, five, six, seven.
Tokens flow through embeddings, attention and feed-forward layers, then out through the head.
Weights are read from safetensors files; every byte is checked against the header's offsets.
Numbers like 3.14159 and 2.71828 appear, as do names like Ada, Grace, Linus and Barbara.
Unicode too: café, naïve, façade, Straße, 東京, Москва, and an emoji 🙂 now and then.
"""


@dataclass
class CheckpointSpec:
    """Sizes of a built checkpoint (the defaults are the tiny CPU test shape)."""

    arch: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 384
    tie: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 512
    sliding_window: int | None = None


def _hf_config(spec: CheckpointSpec):
    import transformers

    cls = getattr(transformers, ARCHS[spec.arch].replace("ForCausalLM", "Config"))
    kwargs = dict(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie,
        rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
        head_dim=spec.head_dim or spec.hidden_size // spec.heads,
    )
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    kwargs["rope_parameters"] = rope
    if spec.arch == "mistral":
        kwargs["sliding_window"] = spec.sliding_window
    return cls(**kwargs)


def train_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """Write tokenizer.json (byte-level BPE, BOS added by the post-processor) and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.splitlines() * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
    }, indent=2))


def build_checkpoint(out_dir: str | Path, spec: CheckpointSpec | None = None, *, dtype: str = "float32",
                     seed: int = 0, weight_std: float | None = None, max_shard_size: str | None = None,
                     tokenizer: bool = True, device: str = "cpu", **sizes) -> Path:
    """Create a random-weight HF checkpoint in ``out_dir`` and return the path.

    ``sizes`` override fields of :class:`CheckpointSpec` (e.g. ``arch="qwen3", tie=True``).
    ``max_shard_size`` (e.g. ``"30KB"``) writes a sharded checkpoint with an index.
    ``weight_std`` defaults to ``0.15 * sqrt(64 / hidden_size)`` (0.15 for the tiny shape,
    ~0.027 at hidden 2048) so activations stay in a sane range at any size.
    """
    import torch
    import transformers

    spec = spec or CheckpointSpec()
    for k, v in sizes.items():
        setattr(spec, k, v)
    out = Path(out_dir)
    if weight_std is None:
        weight_std = 0.15 * (64 / spec.hidden_size) ** 0.5
    torch.manual_seed(seed)
    config = _hf_config(spec)
    with torch.device(device):  # realistic shapes: build where the memory is
        model = getattr(transformers, ARCHS[spec.arch])(config)
    model = model.to(dtype=getattr(torch, dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(weight_std * noise)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        train_tokenizer(out, vocab_size=min(320, spec.vocab_size))
    del model
    return out


def load_hf(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """The HF model of a checkpoint, eval mode, eager attention (the reference math)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), attn_implementation="eager")
    return model.to(device).eval()


def hf_logits(model, ids) -> np.ndarray:
    """fp32 numpy ``[T, vocab]`` logits of one teacher-forced sequence."""
    import torch

    with torch.no_grad():
        x = torch.tensor([list(ids)], device=model.device)
        return model(x).logits[0].float().cpu().numpy()


def hf_greedy(model, ids, new_tokens: int) -> tuple[list[int], np.ndarray]:
    """HF ``generate`` greedy: (generated ids, fp32 ``[new_tokens, vocab]`` logits of each step).

    EOS is disabled (on the model's generation config itself: transformers versions differ in
    how a per-call ``eos_token_id=None`` merges) so the run always has ``new_tokens`` ids.
    """
    import torch

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            x = torch.tensor([list(ids)], device=model.device)
            # An explicit mask: otherwise HF takes BOS (id 0 = pad_token_id) for padding.
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0, return_dict_in_generate=True,
                                 output_logits=True)
    finally:
        model.generation_config.eos_token_id = saved
    generated = out.sequences[0, len(ids):].tolist()
    assert len(generated) == new_tokens, f"HF stopped after {len(generated)} of {new_tokens} tokens"
    logits = torch.stack(out.logits, dim=1)[0].float().cpu().numpy()
    return generated, logits


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Norm-wise relative error ``||a - b|| / ||b||``."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def compare_greedy(ours: list[int], ref: list[int], ref_logits: np.ndarray, tie_tol: float = 1e-4) -> dict:
    """Compare two greedy runs. A first difference where HF's two best logits are closer
    than ``tie_tol`` is a tie (the runs may legitimately diverge from there); any other
    difference is a mismatch. Returns ``{"matched", "tie_at", "mismatch_at", "gap"}``."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = np.sort(ref_logits[i])[-2:]
            gap = float(top2[1] - top2[0])
            key = "tie_at" if gap < tie_tol else "mismatch_at"
            return {"matched": i, key: i, "gap": gap, "ours": a, "hf": b}
    if len(ours) != len(ref):
        return {"matched": min(len(ours), len(ref)), "mismatch_at": min(len(ours), len(ref)), "gap": None}
    return {"matched": len(ref)}


# -- one build per test process, shared by every test module ------------------------------
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    # tied embeddings, llama3 rope scaling with a high theta (Llama 3.x style)
    "llama": dict(arch="llama", tie=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    # untied; a sliding window shorter than the test sequences so the window is exercised
    "mistral": dict(arch="mistral", sliding_window=16),
    # untied, q/k/v biases
    "qwen2": dict(arch="qwen2"),
    # tied, per-head q/k norms, head_dim (32) != hidden / heads (16)
    "qwen3": dict(arch="qwen3", tie=True, head_dim=32),
    # Llama 2 style (untied, plain rope), written as shards with an index
    "llama_sharded": dict(arch="llama", max_shard_size="30KB"),
    # bf16 weights on disk
    "qwen2_bf16": dict(arch="qwen2", dtype="bfloat16"),
}
_BUILT: dict[str, Path] = {}
_ROOT: list[Path] = []


def checkpoint(variant: str) -> Path:
    """Path of a built checkpoint variant (:data:`VARIANTS`), built once per process.

    Tests must not modify it: copy it first (:func:`copy_checkpoint`).
    """
    if variant not in _BUILT:
        import atexit
        import shutil
        import tempfile

        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="nexusrt-ckpt-")))
            atexit.register(shutil.rmtree, _ROOT[0], True)
        kwargs = dict(VARIANTS[variant])
        _BUILT[variant] = build_checkpoint(_ROOT[0] / variant, CheckpointSpec(), seed=len(_BUILT) + 1, **kwargs)
    return _BUILT[variant]


def copy_checkpoint(variant: str, dest: Path) -> Path:
    """A private copy of a built variant, for tests that break files."""
    import shutil

    return Path(shutil.copytree(checkpoint(variant), dest))
