"""LangChain integration for ctxmem: `ChatCtxMem`, a chat model whose memory outlives its context window."""

from langchain_ctxmem.chat_model import ChatCtxMem

__all__ = ["ChatCtxMem"]
