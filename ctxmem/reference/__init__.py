"""The reference model that ctxmem trains and ships: its corpus, chat template, synthetic data and toy tools."""
