"""LangChain integration for ctxmem.

NOTE: the chat model `ChatCtxMem` is not built yet; this package only reserves its import
path so that `pip install ctxmem` installs both packages from one pyproject.
"""

__all__: list[str] = []
