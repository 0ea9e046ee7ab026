"""lowra.sdk."""
