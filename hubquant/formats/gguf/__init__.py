"""GGUF output (llama.cpp, Ollama, LM Studio): block quantizers, the llama.cpp type mixes, metadata, writer."""
