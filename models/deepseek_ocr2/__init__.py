"""DeepSeek-OCR 2 on transformers' own configuration, processor and vision encoder, with the
port's DeepSeek-MoE decoder and batched generator for the language model."""
