"""(filled in by its kernel family)"""

__all__: list[str] = []
