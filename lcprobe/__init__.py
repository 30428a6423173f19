"""lcprobe: layer-wise probing of quantized GGUF models through llama.cpp."""

__version__ = "0.1.0"
