"""Reading checkpoints: GGUF files, Hugging Face safetensors dirs, dummy weights."""
