"""A tiny, randomly initialised T5 with a locally trained tokenizer: the real translation code path
without downloading weights (the answers are noise; their shape is what matters)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "translate English to German: The weather is lovely today",
    "translate English to French: Hello my name is Jonathan",
    "Das Wetter ist heute schön",
    "Il fait beau aujourd'hui",
    "Bonjour, je m'appelle Jonathan",
]


def build_tiny_t5(directory: Path, *, seed: int = 0) -> Path:
    """Write a tokenizer + T5ForConditionalGeneration checkpoint (~40 KB) to `directory`."""
    import sentencepiece
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    prefix = directory / "spiece"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    pieces = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.vocab_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, unk_id=2)
    torch.manual_seed(seed)
    config = T5Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer), d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, d_kv=8,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model_dir = directory / "t5"
    T5ForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for scratch in (corpus, Path(f"{prefix}.model"), Path(f"{prefix}.vocab")):
        scratch.unlink(missing_ok=True)
    return model_dir
