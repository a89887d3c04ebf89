"""The toy base LM: a byte-level BPE and a small Qwen3-shaped model trained on Shakespeare.

Trained with plain HF + torch (the base is an ordinary causal LM; nla_lens only reads it). Its
tokenizer holds what an NLA needs: a chat template, the marker char as one token, and the
explanation tags as single tokens, so the toy AV spends its capacity on content, not markup.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

MARKER = "㈎"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<explanation>", "</explanation>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class BaseConfig:
    """The toy base model's shape (a small Qwen3) and its seeded pretraining run."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    n_ctx: int = 256
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    core.add_tokens([AddedToken(t, normalized=False) for t in [MARKER, *TAGS]])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def build_model(cfg: BaseConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    torch.manual_seed(cfg.seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads, max_position_embeddings=cfg.n_ctx, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6,
    )
    return Qwen3ForCausalLM(config)


def _batches(docs: list[list[int]], cfg: BaseConfig, rng: random.Random):
    stream = [t for d in docs for t in d]
    while True:
        starts = [rng.randrange(0, len(stream) - cfg.seq_len - 1) for _ in range(cfg.batch_size)]
        yield torch.tensor([stream[s:s + cfg.seq_len + 1] for s in starts])


def train_base(model: Qwen3ForCausalLM, docs: list[list[int]], cfg: BaseConfig) -> list[float]:
    """AdamW with warmup + cosine; returns the training losses."""
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    losses = []
    model.train()
    batches = _batches(docs, cfg, rng)
    for _ in tqdm(range(cfg.steps), desc="base LM", unit="step"):
        batch = next(batches)
        loss = _lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _lm_loss(model: Qwen3ForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@torch.inference_mode()
def perplexities(model: Qwen3ForCausalLM, train_docs: list[list[int]], eval_docs: list[list[int]],
                 seq_len: int) -> tuple[float, float]:
    """Held-out perplexity of the model and of a unigram model fitted on the training tokens."""
    model.eval()
    stream = [t for d in eval_docs for t in d]
    chunks = [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len - 1, seq_len)]
    total, count = 0.0, 0
    for i in range(0, len(chunks), 32):
        batch = torch.tensor(chunks[i:i + 32])
        total += _lm_loss(model, batch).item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    counts = Counter(t for d in train_docs for t in d)
    n = sum(counts.values())
    vocab = len(counts) + 1
    unigram = -sum(math.log((counts.get(t, 0) + 1) / (n + vocab)) for c in chunks for t in c[1:]) / count
    return math.exp(total / count), math.exp(unigram)
