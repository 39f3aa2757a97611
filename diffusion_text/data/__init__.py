"""Text sources, tokenizer and input pipeline."""
