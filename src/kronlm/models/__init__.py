"""Models: loading from the hub, folders and GGUF files, and kronlm's Hugging Face Auto classes."""
