"""simsearch: content-based image similarity search with ResNet-50 embeddings, FAISS and Lightning."""

__version__ = "0.1.0"
