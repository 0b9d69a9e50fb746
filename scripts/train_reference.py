#!/usr/bin/env python3
"""Train ``nexusrt:stdlib-tiny``: a small Llama on the Python standard library's own source.

Every machine with Python has this text offline, so the model (and this script) need no
download. The data are the files named in ``scripts/stdlib_tiny_files.txt`` (``train``
and ``eval`` lines, paths relative to ``sysconfig.get_paths()['stdlib']``, or ``--stdlib``); a missing file
stops the script with its name. Eval files are held out from both the tokenizer and the
model and shipped, as text, in ``heldout.json.gz`` so perplexity is comparable on any
machine whatever its Python version.

Steps:
  1. a byte-level BPE tokenizer (``tokenizers``) on the training files, with BOS/EOS and
     chat-marker specials and a chat template;
  2. training documents: each file as ``<|bos|>`` + source + ``<|eos|>``, plus short chat
     exchanges made from the files' docstrings (so ``--chat`` answers in kind), cut into
     fixed windows whose order is shuffled by a seeded generator;
  3. ``LlamaForCausalLM`` trained with AdamW, warmup + cosine over ``--steps`` (the schedule
     depends only on the step count, never on the clock: same flags, same model);
  4. bf16 safetensors + tokenizer files via ``save_pretrained``, held-out perplexity, sample
     continuations, and ``manifest.json`` with the command, data list and SHA-256 of each file.

Runs on CUDA when torch sees a GPU (minutes), else on the CPU (``--threads``, slow: pick
``--steps`` for the time you have; ``--max-minutes`` stops early and still exports).
``--resume`` continues from ``OUT/train_state.pt`` (written every ``--save-every`` steps).

    python3 scripts/train_reference.py --out nexusrt/models/presets/stdlib_tiny
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import shlex
import sys
import sysconfig
import time
from pathlib import Path

FILE_LIST = Path(__file__).with_name("stdlib_tiny_files.txt")
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS = "<|bos|>", "<|eos|>"
# Rendered by HF's renderer and by nexusrt.models.chat alike (no features beyond plain Jinja).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    \"\"\"",
                  "    def __init__(self, "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (HF layout + manifest.json)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (sets the LR schedule)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long, then export")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--stdlib", default=None, metavar="DIR",
                   help="the standard library folder the file list is relative to (default: this Python's; "
                        "another Python's gives the same data, e.g. a 3.11 tree on a 3.12 machine)")
    return p.parse_args(argv)


# -- data -----------------------------------------------------------------------------------
def read_file_list(stdlib: Path) -> tuple[list[str], list[str]]:
    """(train, eval) relative paths from FILE_LIST; exits naming every missing file."""
    train, held = [], []
    for line in FILE_LIST.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, rel = line.split(None, 1)
        (train if kind == "train" else held if kind == "eval" else sys.exit(f"{FILE_LIST}: bad line {line!r}")).append(rel)
    missing = [r for r in train + held if not (stdlib / r).is_file()]
    if missing:
        sys.exit(f"train_reference: {len(missing)} listed file(s) missing under {stdlib}: {', '.join(missing)}")
    if set(train) & set(held):
        sys.exit(f"train_reference: files both train and eval: {sorted(set(train) & set(held))}")
    return train, held


def docstring_chats(source: str, module: str) -> list[str]:
    """Chat exchanges 'what does X do?' -> the first paragraph of X's docstring."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        answer = doc.strip().split("\n\n")[0].strip()
        if 20 <= len(answer) <= 600:
            out.append(f"{BOS}<|user|>\nWhat does {module}.{node.name} do?<|end|>\n<|assistant|>\n{answer}<|end|>\n{EOS}")
    return out


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    # The post-processor adds BOS, so HF and NexusRT encode a plain prompt identically.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


def windows(ids, seq_len: int):
    """The id stream cut into non-overlapping [n, seq_len + 1] windows (inputs + next-token targets)."""
    import torch

    n = (len(ids) - 1) // seq_len
    t = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([t[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


# -- model ----------------------------------------------------------------------------------
def build_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.token_to_id(BOS),
        eos_token_id=[tok.token_to_id(EOS), tok.token_to_id("<|end|>")], pad_token_id=None)
    return LlamaForCausalLM(cfg)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def heldout_ids(tok, heldout: list[dict]) -> list[int]:
    ids = []
    for doc in heldout:
        ids += tok.encode(doc["text"]).ids  # BOS from the post-processor
    return ids


def perplexity(model, ids: list[int], window: int, device) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows (the first token of each is not scored)."""
    import torch

    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[s:s + window], device=device)[None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count), count


def greedy(model, tok, prompt: str, n: int, device) -> str:
    import torch

    ids = torch.tensor(tok.encode(prompt).ids, device=device)[None]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)


# -- export ---------------------------------------------------------------------------------
def export(model, tok, out: Path, heldout: list[dict]):
    """HF layout in bf16, plus heldout.json.gz (gzip mtime 0, so its hash is reproducible).

    The tokenizer files are written by hand: ``save_pretrained`` of transformers 5 names a
    v5-only tokenizer class and moves the chat template to a separate file; this layout
    loads in transformers 4 and 5 and keeps every file the manifest hashes in one place.
    """
    import copy

    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    # A bf16 copy: rounding the training model itself would perturb the run at every save.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": "<|pad|>",
        "add_bos_token": False, "model_max_length": model.config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE}, indent=1) + "\n", encoding="utf-8")
    eos = [tok.token_to_id(EOS), tok.token_to_id("<|end|>")]
    GenerationConfig(bos_token_id=tok.token_to_id(BOS), eos_token_id=eos, do_sample=False).save_pretrained(out)
    with open(out / "heldout.json.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(heldout, ensure_ascii=False).encode("utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    train_files, eval_files = read_file_list(stdlib)
    texts = [(stdlib / r).read_text(encoding="utf-8") for r in train_files]
    heldout = [{"file": r, "text": (stdlib / r).read_text(encoding="utf-8")} for r in eval_files]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tok = train_tokenizer(texts, args.vocab)
    docs = [f"{BOS}{t}{EOS}" for t in texts]
    for r, t in zip(train_files, texts):
        docs += docstring_chats(t, r[:-3].replace("/", "."))
    # Specials are written literally in docs, so encode without the post-processor's BOS.
    ids = [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids]
    data = windows(ids, args.seq_len)
    print(f"tokenizer {tok.get_vocab_size()} ids; {len(ids)} training tokens in {len(data)} windows "
          f"of {args.seq_len}; device {device}", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(args, tok).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, elapsed_before = 0, 0.0
    state_path = out / "train_state.pt"
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed_before = st["step"], st["elapsed"]
        print(f"resumed at step {start}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = len(data) // args.batch
    order, epoch = None, -1
    use_bf16 = device.type == "cuda"
    t_train = time.time()
    steps_done = start
    for step in range(start, args.steps):
        e, k = divmod(step, per_epoch)
        if e != epoch:  # replay the generator up to this epoch so a resume sees the same order
            while epoch < e:
                order, epoch = torch.randperm(len(data), generator=gen), epoch + 1
        batch = data[order[k * args.batch:(k + 1) * args.batch]].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        elapsed = elapsed_before + time.time() - t_train
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step, args):.2e} {elapsed / 60:.1f} min", flush=True)
        if (step + 1) % args.save_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "elapsed": elapsed}, state_path)
            export(model, tok, out, heldout)
        if args.max_minutes and elapsed > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes}", flush=True)
            break
    train_minutes = (elapsed_before + time.time() - t_train) / 60

    export(model, tok, out, heldout)
    # Figures from the shipped (bf16) weights, computed in fp32 as the CPU runner does.
    from transformers import LlamaForCausalLM

    shipped = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    ppl, n_tok = perplexity(shipped, heldout_ids(tok, heldout), args.seq_len, device)
    samples = {p: greedy(shipped, tok, p, 48, device) for p in SAMPLE_PROMPTS}
    print(f"held-out perplexity {ppl:.3f} over {n_tok} tokens", flush=True)
    for p, s in samples.items():
        print(f"--- {p!r} ->\n{s}", flush=True)

    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "heldout.json.gz"]
    manifest = {
        "name": "nexusrt:stdlib-tiny",
        # The command that reproduces the run; --resume only continues it (same order, same schedule).
        "command": "python3 " + " ".join(shlex.quote(a) for a in ["scripts/train_reference.py",
                                                                  *(a for a in argv if a != "--resume")]),
        "resumed_at_step": start if args.resume else None,
        "python_version": sys.version.split()[0], "stdlib": str(stdlib), "torch": torch.__version__,
        "device": device.type, "seed": args.seed, "steps": steps_done, "planned_steps": args.steps,
        "batch": args.batch, "seq_len": args.seq_len, "training_tokens_per_epoch": len(ids),
        "tokens_seen": steps_done * args.batch * args.seq_len, "train_minutes": round(train_minutes, 2),
        "wall_minutes": round((time.time() - t0) / 60, 2), "parameters": sum(p.numel() for p in model.parameters()),
        "heldout": {"perplexity": round(ppl, 4), "tokens": n_tok, "window": args.seq_len,
                    "note": "fp32 HF transformers on the shipped bf16 weights"},
        "samples": samples,
        "data": {"train": train_files, "eval": eval_files},
        "sha256": {f: sha256(out / f) for f in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = (out / "model.safetensors").stat().st_size
    print(f"model.safetensors {size} bytes; manifest written", flush=True)
    if size > 10 * 1024 * 1024:
        sys.exit(f"model.safetensors is {size} bytes, over the 10 MB budget")


def _loss(model, batch):
    import torch

    logits = model(batch[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


if __name__ == "__main__":
    main()
