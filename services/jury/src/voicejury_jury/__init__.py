"""VoiceJury's jury stage: three personas comment on a scored performance and vote.

Importing this package is cheap and offline; litellm is loaded on first use or by
`warm_up()`.
"""

from .core import MIN_COMMENT_CHARS, PROMPT_VERSION, JuryConfig, convene_jury, warm_up

__all__ = ["MIN_COMMENT_CHARS", "PROMPT_VERSION", "JuryConfig", "convene_jury", "warm_up"]
