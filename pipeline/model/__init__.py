"""The book's GPT (GPT-2 compatible), its weights, LoRA and generation. Import submodules directly;
`pipeline.model.config` is torch-free so that `plan` can use it without importing torch."""
