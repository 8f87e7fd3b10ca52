"""Data pipeline: documents -> filtered, deduplicated corpus -> tokenizer -> packed token shards."""
