"""Bridges to other tools' plugin interfaces. Each subpackage is imported only by the tool it serves
(``import vlmopt`` imports none of them)."""
