"""A toy model that knows facts, for the knowledge-editing tests: a 4-layer Llama with a word-level
tokenizer, trained for some seconds on twelve of builtin:counterfacts' capitals (prompts and paraphrases).

A random model knows nothing and routes nothing (its next-token distribution barely depends on the
prompt), so an edit on it shows nothing; this one answers the prompts it was trained on. It stores
each fact at the prompt's last token rather than at the subject's (attention reads the subject's
embedding directly), so the tests edit with ``fact_token="last"``, the reference code's other lookup
strategy; on models that enrich the subject's token (the paper's finding), ``subject_last`` is the
default.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polmctl.data import load_rows, pad_collate
from polmctl.editing.facts import RELATIONS, fact_requests
from polmctl.editing.requests import EditRequest, Neighbour

_CAPITALS = [r for r in fact_requests(0) if r.prompt == RELATIONS["capital"][0]][:12]
SPECIALS = ["<pad>", "<|im_end|>", "[UNK]"]


def unseen_answers() -> list[str]:
    """Capitals the toy model was never trained to say (their countries are not among its twelve)."""
    seen = {r.target_true for r in _CAPITALS}
    return [a for _, a in RELATIONS["capital"][2] if a not in seen]


def toy_requests() -> list[EditRequest]:
    """The twelve capital requests the toy model knows, each with two neighbours it knows too."""
    out = []
    for i, r in enumerate(_CAPITALS):
        others = [_CAPITALS[(i + k) % len(_CAPITALS)] for k in (1, 2)]
        neighbours = [Neighbour(o.text, o.target_true) for o in others]
        out.append(EditRequest(r.subject, r.prompt, r.target_new, r.target_true, r.paraphrases, neighbours, r.where))
    return out


def training_texts() -> list[str]:
    """Each prompt with its answer, a full stop and the end-of-text token (what format_completion adds)."""
    texts = []
    for r in _CAPITALS:
        texts.append(f"{r.text} {r.target_true} . <|im_end|>")
        texts += [f"{p} {r.target_true} . <|im_end|>" for p in r.paraphrases]
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace words of the training texts, every answer of the capital relation and the words of
    builtin:domain_text (the calibration and fluency text), then [UNK] for anything else."""
    words = {w for t in training_texts() for w in t.split()} - {"<|im_end|>"}
    words |= {w for _, a in RELATIONS["capital"][2] for w in a.split()}
    for split in ("train", "test"):
        words |= {w for row in load_rows("builtin:domain_text", split) for w in row["text"].split()}
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>", unk_token="[UNK]")


def build_facts_model(target: Path, steps: int = 200) -> Path:
    """Train the toy model and write it (with its tokenizer) to ``target``; a second call reuses it."""
    if (target / "config.json").exists():
        return target
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        ids = [tok(t)["input_ids"] for t in training_texts()]
        batch = pad_collate([{"input_ids": i, "labels": i} for i in ids], tok.pad_token_id)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        model.train()
        for _ in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target
