"""attnforge: verified attention-kernel acceleration for LLM inference."""

from attnforge.config import AttentionConfig

__all__ = ["AttentionConfig"]
__version__ = "0.1.0"
