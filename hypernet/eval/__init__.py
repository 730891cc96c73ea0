"""Measured identity quality: the face corpus, face embeddings, methods compared, the report."""
